"""The one deliberate torch.compile test on CPU (compiling costs tens of seconds on 2 cores; every other CPU test runs
eagerly). GPU runs compile the model by default, so the model code must trace without graph breaks."""

import pytest
import torch

import train_gpt as tg


@pytest.mark.slow
def test_compiled_model_matches_eager_forward_and_backward():
    torch.manual_seed(0)
    model = tg.GPT(tg.ModelConfig(vocab_size=64, num_layers=2, model_dim=32, num_heads=4, num_kv_heads=2))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    ids = torch.randint(4, 64, (2, 24))
    targets = torch.roll(ids, -1, 1)

    eager_losses = model(ids, targets)
    eager_losses.sum().backward()
    eager_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    compiled = torch.compile(model, fullgraph=True, dynamic=False)  # fullgraph: a graph break is an error
    compiled_losses = compiled(ids, targets)
    compiled_losses.sum().backward()
    torch.testing.assert_close(compiled_losses, eager_losses, rtol=1e-5, atol=1e-5)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, rtol=1e-4, atol=1e-5)
