"""Hugging Face drop-in: tiny random models built here (nothing is downloaded), patched vs original."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from sonic_learn.integrations import hf  # noqa: E402
from sonic_learn.reference.moe import concat_gate_up  # noqa: E402

COMMON = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64)


def _mixtral():
    return transformers.MixtralConfig(**COMMON, intermediate_size=24, num_local_experts=5, num_experts_per_tok=2)


def _olmoe():
    return transformers.OlmoeConfig(**COMMON, intermediate_size=24, num_experts=6, num_experts_per_tok=3,
                                    norm_topk_prob=False)


def _qwen3(norm=True):
    return transformers.Qwen3MoeConfig(**COMMON, head_dim=8, intermediate_size=48, moe_intermediate_size=16,
                                       num_experts=6, num_experts_per_tok=2, norm_topk_prob=norm,
                                       decoder_sparse_step=1, mlp_only_layers=[])


def _qwen2(mlp_only_layers=()):
    return transformers.Qwen2MoeConfig(**COMMON, intermediate_size=48, moe_intermediate_size=16,
                                       shared_expert_intermediate_size=40, num_experts=4, num_experts_per_tok=2,
                                       norm_topk_prob=False, decoder_sparse_step=1,
                                       mlp_only_layers=list(mlp_only_layers))


CONFIGS = {"mixtral": _mixtral, "olmoe": _olmoe, "qwen3_moe": _qwen3, "qwen3_moe_unnormalised": lambda: _qwen3(False),
           "qwen2_moe": _qwen2}


def _model(config, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # every weight random (some routers start at zero: ties we do not want)
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.to(dtype).eval()


def _tokens(n=2, s=9, seed=1):
    return torch.randint(0, 64, (n, s), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_patched_model_matches_original(name):
    original = _model(CONFIGS[name]())
    patched = copy.deepcopy(original)
    assert hf.replace_moe_blocks(patched) == 2
    assert sum(isinstance(m, hf.SonicMoEBlock) for m in patched.modules()) == 2
    ids = _tokens()
    with torch.no_grad():
        want = original(ids).logits
        got = patched(ids).logits
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_weights_are_converted_not_shared():
    original = _model(_mixtral())
    block = original.model.layers[0].mlp
    patched = copy.deepcopy(original)
    hf.replace_moe_blocks(patched)
    moe = patched.model.layers[0].mlp.moe
    # w1 (E, d, 2n) interleaved <-> HF gate_up_proj (E, 2n, d) as [gate | up]
    torch.testing.assert_close(concat_gate_up(moe.w1).transpose(1, 2), block.experts.gate_up_proj, rtol=0, atol=0)
    torch.testing.assert_close(moe.w1[..., 0::2], block.experts.gate_up_proj[:, :24].transpose(1, 2), rtol=0, atol=0)
    torch.testing.assert_close(moe.w2.transpose(1, 2), block.experts.down_proj, rtol=0, atol=0)
    torch.testing.assert_close(moe.router_w.t(), block.gate.weight, rtol=0, atol=0)
    assert moe.w1.data_ptr() != block.experts.gate_up_proj.data_ptr()


def test_qwen2_shared_expert_and_dense_layers():
    original = _model(_qwen2(mlp_only_layers=[1]))
    patched = copy.deepcopy(original)
    assert hf.replace_moe_blocks(patched) == 1  # layer 1 is a dense MLP, left alone
    assert patched.model.layers[0].mlp.shared_expert is not None
    ids = _tokens()
    with torch.no_grad():
        torch.testing.assert_close(patched(ids).logits, original(ids).logits, rtol=1e-4, atol=1e-5)


def test_backward_step_and_router_losses():
    original = _model(_mixtral())
    patched = copy.deepcopy(original)
    hf.replace_moe_blocks(patched)
    patched.train()
    ids = _tokens()
    out = patched(ids, labels=ids)
    stats = hf.router_stats(patched)
    assert len(stats) == 2
    loss = out.loss + 0.01 * sum(s.load_balancing_loss for s in stats) + 0.001 * sum(s.z_loss for s in stats)
    loss.backward()
    moe = patched.model.layers[0].mlp.moe
    for p in (moe.router_w, moe.w1, moe.w2):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    before = moe.w1.detach().clone()
    torch.optim.SGD(patched.parameters(), lr=0.1).step()
    assert not torch.equal(before, moe.w1)
    # the same gradients as the original model (fp32)
    original.train()
    original(ids, labels=ids).loss.backward()
    ref_block = original.model.layers[0].mlp
    patched.zero_grad()
    patched_again = copy.deepcopy(original)
    hf.replace_moe_blocks(patched_again)
    patched_again(ids, labels=ids).loss.backward()
    got = patched_again.model.layers[0].mlp.moe
    torch.testing.assert_close(got.router_w.grad.t(), ref_block.gate.weight.grad, rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(got.w2.grad.transpose(1, 2), ref_block.experts.down_proj.grad, rtol=1e-3, atol=1e-6)


def test_load_balancing_loss_is_hf_over_k():
    """HF's load_balancing_loss_func divides counts by T, ours by T*K (see sonic_learn.losses)."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    original = _model(_mixtral())
    patched = copy.deepcopy(original)
    hf.replace_moe_blocks(patched)
    ids = _tokens()
    with torch.no_grad():
        router_logits = original(ids, output_router_logits=True).router_logits
        patched(ids)
    for layer_logits, s in zip(router_logits, hf.router_stats(patched)):
        want = load_balancing_loss_func((layer_logits,), 5, 2)
        torch.testing.assert_close(2 * s.load_balancing_loss, want, rtol=1e-5, atol=1e-6)


def test_nothing_to_replace_and_bad_arguments():
    assert hf.replace_moe_blocks(torch.nn.Sequential(torch.nn.Linear(4, 4))) == 0
    with pytest.raises(ValueError, match="backend must be one of"):
        hf.replace_moe_blocks(torch.nn.Linear(2, 2), backend="cuda")
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        hf.replace_moe_blocks("mixtral")
    block = _model(_mixtral()).model.layers[0].mlp
    with pytest.raises(ValueError, match="model must contain the MoE blocks"):
        hf.replace_moe_blocks(block)


def test_non_silu_experts_are_refused():
    config = _mixtral()
    config.hidden_act = "gelu"
    with pytest.raises(ValueError, match="activation must be silu"):
        hf.replace_moe_blocks(_model(config))


@pytest.mark.gpu
def test_fast_backend_bf16_matches_original():
    config = transformers.MixtralConfig(**{**COMMON, "hidden_size": 64}, intermediate_size=32, num_local_experts=8,
                                        num_experts_per_tok=2)
    original = _model(config, dtype=torch.bfloat16).cuda()
    patched = copy.deepcopy(original)
    assert hf.replace_moe_blocks(patched, backend="fast") == 2
    oracle = copy.deepcopy(original).double()  # the same (bf16-rounded) weights, in fp64
    for module in oracle.modules():  # the per-expert loop: grouped_mm has no fp64 kernel on CUDA
        if getattr(module, "config", None) is not None and hasattr(module.config, "_experts_implementation"):
            module.config._experts_implementation = "eager"
    ids = _tokens(4, 32).cuda()
    with torch.no_grad():
        want = original(ids).logits.double()
        got = patched(ids).logits.double()
        exact = oracle(ids).logits
    # bf16 against the fp64 oracle: the patched model's error stays within ~2x the original's own
    # (mean, so that a near-tie token routed differently by one bf16 model does not dominate)
    err_original = (want - exact).abs().mean().item()
    err_patched = (got - exact).abs().mean().item()
    assert err_patched <= 2 * err_original + 1e-3, (err_patched, err_original)
    patched(ids, labels=ids).loss.backward()
