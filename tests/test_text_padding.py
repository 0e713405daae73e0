"""Skipping Wan's zero text padding in cross-attention is the same attention as over all 512 rows."""

import torch

from wandistiller import text_padding
from wandistiller.model import WanLiteTransformer2DModel


def _padded_text(lengths, total=512, width=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    text = torch.zeros(len(lengths), total, width)
    for i, n in enumerate(lengths):
        text[i, :n] = torch.randn(n, width, generator=g)
    return text


def test_compact_text_keeps_true_rows_and_weights_the_padding():
    text = _padded_text([3, 7, 1])
    compact, bias = text_padding.compact_text(text)
    assert compact.shape == (3, 8, 32) and torch.equal(compact[:, :7], text[:, :7]) and not compact[:, 7].any()
    assert torch.equal(bias[1, 0, 0], torch.tensor([0.0] * 7 + [torch.log(torch.tensor(505.0)).item()]))
    assert torch.isinf(bias[0, 0, 0, 3:7]).all() and bias[0, 0, 0, 7] == torch.log(torch.tensor(509.0))
    full = _padded_text([512, 4])
    assert text_padding.compact_text(full)[1] is None  # a row with no padding: nothing to compact


def test_trimmed_text_is_padded_back_exactly():
    text = _padded_text([3, 7, 1, 512])
    text[1, 2] = 0  # an all-zero row inside the true tokens is kept: only the zeros after the last true row go
    tokens, lengths = text_padding.trim_text(text)
    assert lengths.tolist() == [3, 7, 1, 512] and tokens.shape == (3 + 7 + 1 + 512, 32)
    torch.testing.assert_close(text_padding.pad_text(tokens, lengths), text, rtol=0, atol=0)
    torch.testing.assert_close(text_padding.pad_text(tokens[:3], lengths[:1], 5), text[:1, :5], rtol=0, atol=0)


def test_student_forward_equals_attention_over_all_512_rows(monkeypatch):
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    torch.manual_seed(0)
    student = WanLiteTransformer2DModel(num_attention_heads=2, attention_head_dim=16, text_dim=32, ffn_dim=64,
                                        num_layers=2).eval()
    for p in student.parameters():
        p.data.normal_(0, 0.1)
    x, t, text = torch.randn(3, 16, 8, 8), torch.tensor([900.0, 500.0, 20.0]), _padded_text([3, 7, 1])
    with torch.no_grad():
        fast = student(x, t, text).sample
        for block in student.blocks:
            block.attn2.set_processor(WanAttnProcessor())
        monkeypatch.setattr(text_padding, "compact_text", lambda states: (states, None))
        reference = student(x, t, text).sample
    # The same attention summed over 8 rows instead of 512: float32 rounding only.
    assert (fast - reference).abs().max() <= 1e-5 * reference.abs().max()
    assert not torch.equal(fast, reference)  # the fast path really ran
