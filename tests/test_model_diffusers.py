"""Wan-Lite as a diffusers user finds it: attention processors and backends, QKV fusion, PEFT LoRA, cache hooks,
gradient checkpointing - and students saved before those arrived still load and compute the same."""

from pathlib import Path

import pytest
import torch
from diffusers import attention_backend
from diffusers.hooks import FirstBlockCacheConfig
from diffusers.models.attention_dispatch import _AttentionBackendRegistry
from diffusers.models.transformers.transformer_wan import WanAttnProcessor
from peft import LoraConfig
from safetensors.torch import load_file

from wandistiller.model import WanLiteTransformer2DModel
from wandistiller.text_padding import PaddedTextAttnProcessor

# A tiny student saved by wandistiller 0.1 (commit 05aefe8, before the diffusers mixins), with inputs and the
# output that code computed: weights N(0, 0.3), text padded with zeros (so the padded-text path runs).
OLD_STUDENT = Path(__file__).resolve().parent / "data" / "wanlite_tiny_0.1"
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def tiny_model(seed=0) -> WanLiteTransformer2DModel:
    torch.manual_seed(seed)
    model = WanLiteTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                      text_dim=8, freq_dim=16, ffn_dim=16, num_layers=2).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)  # large weights, so that any difference in attention shows in the output
    return model


def inputs(seed=1, text_rows=24):
    g = torch.Generator().manual_seed(seed)
    text = torch.zeros(2, text_rows, 8)  # zero-padded, as WanPipeline pads prompt embeddings
    text[0, :3], text[1, :9] = torch.randn(3, 8, generator=g), torch.randn(9, 8, generator=g)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([900.0, 250.0]), text


def run(model, x, t, text, **kwargs):
    with torch.no_grad():
        return model(x, t, text, **kwargs).sample


def assert_float_close(actual, expected):
    """Equal up to float32 rounding: the same maths summed in another order (other rows, kernels or fusion)."""
    assert (actual - expected).abs().max() <= 1e-5 * expected.abs().max()


@pytest.fixture
def restore_attention_backend():
    """`set_attention_backend` also switches diffusers' process-wide default; put it back for later tests."""
    previous = _AttentionBackendRegistry._active_backend
    yield
    _AttentionBackendRegistry.set_active_backend(previous)


def test_a_student_saved_before_the_diffusers_mixins_loads_bit_exactly():
    model = WanLiteTransformer2DModel.from_pretrained(OLD_STUDENT).eval()
    saved = load_file(OLD_STUDENT / "diffusion_pytorch_model.safetensors")
    state = model.state_dict()
    assert sorted(state) == sorted(saved)  # the same key names: no mapping needed, nothing missing or unexpected
    for name, tensor in saved.items():
        assert torch.equal(state[name], tensor), name
    io = load_file(OLD_STUDENT / "reference_io.safetensors")
    sample = run(model, io["hidden_states"], io["timestep"], io["encoder_hidden_states"])
    # Same code path and weights: identical on the machine that wrote it; the tolerance is only for another
    # CPU's kernels summing in another order.
    torch.testing.assert_close(sample, io["sample"], rtol=0, atol=1e-6 * io["sample"].abs().max().item())


def test_attention_processors_get_set_round_trip():
    model, (x, t, text) = tiny_model(), inputs()
    reference = run(model, x, t, text)
    processors = model.attn_processors
    assert sorted(processors) == sorted(f"blocks.{i}.attn{a}.processor" for i in range(2) for a in (1, 2))
    assert isinstance(processors["blocks.1.attn2.processor"], PaddedTextAttnProcessor)

    model.set_attn_processor(WanAttnProcessor())  # diffusers' own: the full 24 text rows, no padding trick
    assert all(type(p) is WanAttnProcessor for p in model.attn_processors.values())
    plain = run(model, x, t, text)
    assert_float_close(plain, reference)
    assert not torch.equal(plain, reference)  # a different computation really ran

    model.set_attn_processor(processors)
    assert all(model.attn_processors[name] is p for name, p in processors.items())
    torch.testing.assert_close(run(model, x, t, text), reference, rtol=0, atol=0)
    with pytest.raises(ValueError, match="number of attention layers"):
        model.set_attn_processor({"blocks.0.attn1.processor": WanAttnProcessor()})


def test_a_processor_set_on_some_blocks_runs_and_keeps_the_output():
    model, (x, t, text) = tiny_model(), inputs()
    reference = run(model, x, t, text)
    calls = []

    class CountingProcessor(WanAttnProcessor):
        def __call__(self, attn, *args, **kwargs):
            calls.append(attn)
            return super().__call__(attn, *args, **kwargs)

    model.blocks[0].attn2.set_processor(CountingProcessor())  # one cross-attention without the padding bias
    assert_float_close(run(model, x, t, text), reference)
    assert calls == [model.blocks[0].attn2]


def test_attention_backends_switch_and_keep_the_output(restore_attention_backend):
    model, (x, t, text) = tiny_model(), inputs()
    reference = run(model, x, t, text)
    padded = model.blocks[0].attn2.processor

    model.set_attention_backend("_native_math")
    assert all(p._attention_backend == "_native_math" for p in model.attn_processors.values())
    assert_float_close(run(model, x, t, text), reference)
    assert padded.bias is not None  # a backend with float masks keeps the padding trick

    # PyTorch's flash kernel takes no mask: the text then goes through whole, and gives the same attention.
    model, x, t, text = model.to(torch.bfloat16), x.bfloat16(), t.bfloat16(), text.bfloat16()
    native = run(model, x, t, text).float()
    model.set_attention_backend("_native_flash")
    flash = run(model, x, t, text).float()
    assert padded.bias is None
    assert (flash - native).abs().max() <= 0.05 * native.abs().max()  # bfloat16 rounding, different summation
    model.reset_attention_backend()
    with attention_backend("_native_flash"):  # diffusers' context manager switches the default backend
        torch.testing.assert_close(run(model, x, t, text).float(), flash, rtol=0, atol=0)


def test_fused_qkv_projections_give_the_same_output_and_unfuse_restores():
    model, (x, t, text) = tiny_model(), inputs()
    keys, reference = list(model.state_dict()), run(model, x, t, text)
    model.fuse_qkv_projections()
    block = model.blocks[1]
    assert block.attn1.fused_projections and block.attn1.to_qkv.weight.shape == (48, 16)
    assert block.attn2.fused_projections and block.attn2.to_kv.weight.shape == (32, 16)  # cross: k and v only
    assert_float_close(run(model, x, t, text), reference)

    model.unfuse_qkv_projections()
    assert not hasattr(block.attn1, "to_qkv") and not hasattr(block.attn2, "to_kv")
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(run(model, x, t, text), reference, rtol=0, atol=0)


def test_a_lora_adapter_trains_saves_reloads_and_changes_the_output(tmp_path):
    base_dir, lora_dir = tmp_path / "base", tmp_path / "lora"
    model, (x, t, text) = tiny_model(), inputs()
    model.save_pretrained(base_dir)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    base = run(model, x, t, text)

    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=LORA_TARGETS))
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * 2 * 4 * 2  # blocks x (attn1, attn2) x targets x (lora_A, lora_B)
    assert all(".lora_A." in name or ".lora_B." in name for name in trainable)
    torch.testing.assert_close(run(model, x, t, text), base, rtol=0, atol=0)  # lora_B starts at zero

    target = torch.randn(base.shape, generator=torch.Generator().manual_seed(2))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(5):
        loss = (model(x, t, text).sample - target).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    assert losses[-1] < 0.98 * losses[0] and all(b < a for a, b in zip(losses, losses[1:])), losses
    for name, p in model.named_parameters():
        if not p.requires_grad:  # the student itself is frozen; only the adapter moved
            assert torch.equal(p, base_state[name.replace(".base_layer", "")]), name

    tuned = run(model, x, t, text)
    assert (tuned - base).abs().max() > 1e-2 * base.abs().max()
    torch.testing.assert_close(run(model, x, t, text, attention_kwargs={"scale": 0.0}), base, rtol=0, atol=0)
    model.disable_adapters()
    torch.testing.assert_close(run(model, x, t, text), base, rtol=0, atol=0)
    model.enable_adapters()

    model.save_lora_adapter(lora_dir)
    assert (lora_dir / "pytorch_lora_weights.safetensors").is_file()
    fresh = WanLiteTransformer2DModel.from_pretrained(base_dir).eval()
    fresh.load_lora_adapter(lora_dir, prefix=None, use_safetensors=True)
    torch.testing.assert_close(run(fresh, x, t, text), tuned, rtol=0, atol=0)


def test_gradient_checkpointing_gives_the_same_adapter_gradients_and_runs_per_block():
    model, (x, t, text) = tiny_model(), inputs()
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=LORA_TARGETS, init_lora_weights=False))
    model.train()

    def gradients():
        model.zero_grad()
        model(x, t, text).sample.square().mean().backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}

    plain = gradients()
    model.enable_gradient_checkpointing()
    checkpointed_calls = []
    checkpoint = model._gradient_checkpointing_func
    model._gradient_checkpointing_func = lambda block, *args: checkpointed_calls.append(block) or checkpoint(block, *args)
    checkpointed = gradients()
    assert checkpointed_calls == list(model.blocks)
    assert plain.keys() == checkpointed.keys() and len(plain) == 32
    for name in plain:
        assert plain[name].abs().sum() > 0, name
        torch.testing.assert_close(checkpointed[name], plain[name], msg=name)  # recomputed forward: same maths


def test_first_block_cache_skips_the_remaining_blocks_when_the_first_barely_changes():
    model, (x, t, text) = tiny_model(), inputs()
    reference = run(model, x, t, text)
    ran_last_block = []
    model.blocks[-1].ffn.register_forward_hook(lambda *_: ran_last_block.append(True))

    model.enable_cache(FirstBlockCacheConfig(threshold=0.05))
    assert model.is_cache_enabled
    with model.cache_context("cond"):
        first = run(model, x, t, text)
        again = run(model, x, t, text)  # same first-block output: the cached residual stands in for block 2
    assert len(ran_last_block) == 1
    torch.testing.assert_close(first, reference, rtol=0, atol=0)
    assert_float_close(again, reference)

    model.disable_cache()
    assert not model.is_cache_enabled
    with torch.no_grad():
        run(model, x, t, text)
    assert len(ran_last_block) == 2
