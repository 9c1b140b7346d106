"""Records: build a record folder, verify it (our rules and the peers'), the leaderboard, reproduce a record."""
