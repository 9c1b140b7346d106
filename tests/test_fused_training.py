"""A training step of a tiny model with every kernel (FUSED=1; Triton's interpreter on CPU) gives the loss and
gradients of the plain-torch model (FUSED=0)."""

import copy

import pytest
import torch

import kernels
import train_gpt as tg


def loss_and_grads(model, fused_ops, ids, targets, cu_seqlens):
    tg.use_fused_ops(fused_ops)
    try:
        model.zero_grad(set_to_none=True)
        losses = model(ids, targets, cu_seqlens, 32)
        losses.sum().backward()
        return losses.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    finally:
        tg.use_fused_ops(())


@pytest.mark.parametrize("fused", [sorted(kernels.OPS), ["softcap_cross_entropy", "rms_norm"]])
def test_fused_training_step_matches_plain(fused):
    if not kernels.triton_available(torch.device("cuda" if torch.cuda.is_available() else "cpu")):
        pytest.skip("Triton cannot run here (no CUDA and TRITON_INTERPRET unset)")
    torch.manual_seed(0)
    config = tg.ModelConfig(vocab_size=72, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1)
    model = tg.GPT(config)
    with torch.no_grad():  # random weights everywhere (zero-initialised projections would hide the attention path)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    ids = torch.randint(4, 72, (1, 45))
    ids[0, [0, 19, 30]] = tg.BOS_ID
    targets = torch.roll(ids, -1, 1)
    targets[targets == tg.BOS_ID] = tg.IGNORE_INDEX
    cu_seqlens = torch.tensor([0, 19, 30, 45, 45], dtype=torch.int32)

    plain_losses, plain_grads = loss_and_grads(model, (), ids, targets, cu_seqlens)
    fused_losses, fused_grads = loss_and_grads(copy.deepcopy(model), fused, ids, targets, cu_seqlens)
    torch.testing.assert_close(fused_losses, plain_losses, rtol=1e-4, atol=1e-5)
    assert plain_grads.keys() == fused_grads.keys()
    for name in plain_grads:
        torch.testing.assert_close(fused_grads[name], plain_grads[name], rtol=1e-3, atol=1e-5,
                                   msg=lambda m: f"gradient of {name}: {m}")

    # the optimizer's orthogonalisation: fused Newton-Schulz equals the plain iteration
    G = plain_grads["blocks.0.mlp.fc.weight"]
    tg.use_fused_ops(fused)
    try:
        fused_update = tg.orthogonalize(G, 5)
    finally:
        tg.use_fused_ops(())
    torch.testing.assert_close(fused_update, tg.orthogonalize(G, 5), rtol=1e-3, atol=1e-4)
