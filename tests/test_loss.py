"""Chunked causal-LM loss: equal to transformers' loss and gradients, through a model and the HF Trainer."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch.testing import assert_close

from grass_llm.loss import ChunkedCausalLMLoss, chunked_cross_entropy, unsupported_reason

transformers = pytest.importorskip("transformers")
from transformers.loss.loss_utils import ForCausalLMLoss  # noqa: E402

from grass_llm.models import tiny_llama  # noqa: E402


def _data(dtype=torch.float32, B=3, T=9, H=16, V=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, H, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(V, H, generator=g) / 4).to(dtype).requires_grad_()
    b = torch.randn(V, generator=g).to(dtype).requires_grad_()
    y = torch.randint(0, V, (B, T), generator=g)
    y[0, :4] = -100  # a masked prompt
    y[2, :] = -100  # a row without any label
    return h, w, b, y


@pytest.mark.parametrize("num_items", [None, "tensor", "int"])
@pytest.mark.parametrize("chunk", [1, 4, 1000])
def test_equals_transformers_loss_and_gradients(num_items, chunk):
    h, w, b, y = _data()
    n = {None: None, "tensor": torch.tensor(7.0), "int": 11}[num_items]
    ref = ForCausalLMLoss(torch.nn.functional.linear(h, w, b), y, w.shape[0], num_items_in_batch=n)
    ref_grads = torch.autograd.grad(ref, (h, w, b))
    got = chunked_cross_entropy(h, w, y, bias=b, num_items_in_batch=n, chunk_tokens=chunk)
    grads = torch.autograd.grad(got, (h, w, b))
    assert got.dtype == torch.float32
    assert_close(got, ref, rtol=1e-6, atol=1e-6)
    for a, e in zip(grads, ref_grads):
        assert_close(a, e, rtol=1e-5, atol=1e-6)


def test_shift_labels_and_scaled_backward():
    h, w, _b, y = _data()
    shifted = torch.nn.functional.pad(y, (0, 1), value=-100)[..., 1:]
    a = chunked_cross_entropy(h, w, y, chunk_tokens=5)
    c = chunked_cross_entropy(h, w, shift_labels=shifted, chunk_tokens=5)
    assert_close(a, c, rtol=0, atol=0)
    (ga,) = torch.autograd.grad(a * 3.0, h)  # a seed other than 1 scales the stored gradients
    ref = ForCausalLMLoss(h @ w.t(), y, w.shape[0])
    (gr,) = torch.autograd.grad(ref * 3.0, h)
    assert_close(ga, gr, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="exactly one"):
        chunked_cross_entropy(h, w, y, shift_labels=shifted)


def test_softcap_matches_capped_logits():
    h, w, _b, y = _data()
    cap = 3.0
    logits = h @ w.t()
    ref = ForCausalLMLoss(cap * torch.tanh(logits / cap), y, w.shape[0])
    ref_grads = torch.autograd.grad(ref, (h, w))
    got = chunked_cross_entropy(h, w, y, softcap=cap, chunk_tokens=4)
    assert_close(got, ref, rtol=1e-6, atol=1e-6)
    for a, e in zip(torch.autograd.grad(got, (h, w)), ref_grads):
        assert_close(a, e, rtol=1e-5, atol=1e-6)


def test_bf16_within_rounding():
    h, w, b, y = _data(torch.bfloat16, T=33, V=300)
    ref = ForCausalLMLoss(torch.nn.functional.linear(h, w, b), y, w.shape[0])
    ref_grads = torch.autograd.grad(ref, (h, w, b))
    got = chunked_cross_entropy(h, w, y, bias=b, chunk_tokens=8)
    assert_close(got, ref, rtol=1e-4, atol=1e-4)  # the same bf16 logits reduced in fp32
    for a, e in zip(torch.autograd.grad(got, (h, w, b)), ref_grads):
        assert a.dtype == torch.bfloat16
        assert_close(a.float(), e.float(), rtol=2e-2, atol=2e-3)


def test_model_hook_skips_logits_in_training_and_matches_model_loss():
    model = tiny_llama(64, num_layers=3, seed=0)
    ref_model = copy.deepcopy(model)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :5] = -100
    n = torch.tensor(13.0)
    ref = ref_model(input_ids=ids, labels=labels, num_items_in_batch=n).loss
    ref.backward()
    loss_fn = ChunkedCausalLMLoss(model)
    out = model(input_ids=ids)
    assert out.logits.shape == (2, 12, 0)  # no logits were made
    loss = loss_fn(out, labels, num_items_in_batch=n)
    loss.backward()
    assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=lambda m, name=name: f"{name}: {m}")
    with torch.no_grad():  # evaluation: the logits are there, the loss is the same
        out = model(input_ids=ids)
        assert out.logits.shape == (2, 12, 64)
        assert_close(loss_fn(out, labels, num_items_in_batch=n), ref, rtol=1e-6, atol=1e-6)
    with pytest.raises(RuntimeError, match="no forward pass"):
        loss_fn(out, labels)
    loss_fn.remove()
    assert model(input_ids=ids).logits.shape == (2, 12, 64)


def test_gemma2_softcapping_through_the_model():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    cfg = Gemma2Config(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        final_logit_softcapping=5.0,
        attn_implementation="eager",
    )
    model = Gemma2ForCausalLM(cfg)
    ids = torch.randint(0, 96, (2, 8))
    ref = model(input_ids=ids, labels=ids).loss
    loss_fn = ChunkedCausalLMLoss(model)
    assert loss_fn.softcap == 5.0
    assert_close(loss_fn(model(input_ids=ids), ids), ref, rtol=1e-6, atol=1e-6)


def test_unsupported_heads_are_named():
    from peft import LoraConfig, get_peft_model

    model = tiny_llama(64, num_layers=2, seed=0)
    assert unsupported_reason(model) is None
    model.config.logit_scale = 0.5
    with pytest.raises(ValueError, match="logit_scale"):
        ChunkedCausalLMLoss(model)
    model.config.logit_scale = None
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["lm_head"]))
    assert "nn.Linear" in unsupported_reason(peft_model)


def test_hf_trainer_compute_loss_func(tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, 64, (16,), generator=g).tolist() for _ in range(8)]
    ds = Dataset.from_dict({"input_ids": rows, "labels": rows})

    def run(chunked: bool):
        model = tiny_llama(64, num_layers=2, seed=0)
        args = TrainingArguments(
            output_dir=str(tmp_path / str(chunked)),
            per_device_train_batch_size=4,
            max_steps=3,
            learning_rate=1e-3,
            logging_steps=1,
            report_to=[],
            save_strategy="no",
            use_cpu=True,
            seed=0,
            disable_tqdm=True,
        )
        kw = {"compute_loss_func": ChunkedCausalLMLoss(model)} if chunked else {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = Trainer(model=model, args=args, train_dataset=ds, **kw)
            trainer.train()
        return [r["loss"] for r in trainer.state.log_history if "loss" in r], model

    ref_losses, ref_model = run(False)
    losses, model = run(True)
    assert len(losses) == 3
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert_close(p, q, rtol=1e-4, atol=1e-6)
