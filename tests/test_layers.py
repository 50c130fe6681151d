"""Layer discovery by introspection on tiny random configs of common decoder architectures."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from grass_llm import GrassConfig, GrassOptimizer, LayerDiscoveryError, discover_layers

SMALL = dict(vocab_size=48, max_position_embeddings=32)


def _arch(name):
    import transformers as tf

    if name == "gpt2":
        return tf.GPT2LMHeadModel(
            tf.GPT2Config(n_embd=16, n_layer=3, n_head=2, vocab_size=48, n_positions=32)
        ), 3
    if name == "opt":
        cfg = tf.OPTConfig(
            hidden_size=16,
            num_hidden_layers=3,
            num_attention_heads=2,
            ffn_dim=32,
            word_embed_proj_dim=16,
            **SMALL,
        )
        return tf.OPTForCausalLM(cfg), 3
    if name == "gpt_neox":
        cfg = tf.GPTNeoXConfig(
            hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32, **SMALL
        )
        return tf.GPTNeoXForCausalLM(cfg), 3
    if name == "phi":
        cfg = tf.PhiConfig(
            hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32, **SMALL
        )
        return tf.PhiForCausalLM(cfg), 3
    classes = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
        "gemma": (tf.GemmaConfig, tf.GemmaForCausalLM),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
    }
    cfg_cls, model_cls = classes[name]
    cfg = cfg_cls(
        hidden_size=16,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=32,
        head_dim=8,
        **SMALL,
    )
    return model_cls(cfg), 3


ARCHS = ["llama", "qwen2", "gemma", "mistral", "gpt2", "gpt_neox", "phi", "opt"]
EXPECTED_PATH = {"gpt2": "transformer.h", "gpt_neox": "gpt_neox.layers", "opt": "model.decoder.layers"}


@pytest.mark.parametrize("arch", ARCHS)
def test_discovers_decoder_blocks(arch):
    model, n = _arch(arch)
    groups = discover_layers(model)
    assert groups.num_layers == n
    assert groups.block_path == EXPECTED_PATH.get(arch, "model.layers")
    all_ids = [id(p) for ps in groups.block_params for p in ps]
    all_ids += [id(p) for p in groups.embeddings + groups.head + groups.norm]
    assert len(all_ids) == len(set(all_ids)), "a parameter is in two groups"
    assert set(all_ids) == {id(p) for p in model.parameters()}, "every parameter is in one group"
    assert any(p is model.get_input_embeddings().weight for p in groups.embeddings)
    out = model.get_output_embeddings().weight
    tied = out is model.get_input_embeddings().weight
    assert (groups.head == []) == tied == groups.tied_head
    if arch in ("gpt2", "opt"):  # learned position embeddings count as embeddings
        assert len(groups.embeddings) >= 2

    # and GRASS trains on it: one step changes exactly the active layer
    opt = GrassOptimizer(model, GrassConfig(active_layers=1, probe_steps=1, period=5), lr=1e-2)
    x = torch.randint(0, 48, (2, 6))
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    before = [torch.cat([p.detach().flatten().clone() for p in ps]) for ps in groups.block_params]
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    changed = [
        i
        for i, ps in enumerate(groups.block_params)
        if not torch.equal(torch.cat([p.detach().flatten() for p in ps]), before[i])
    ]
    assert changed == opt.active_layers


@pytest.mark.parametrize("tie", [True, False])
def test_train_head_trains_a_tied_head_through_the_embeddings(tie):
    """grass.train_head=true on a model whose head is the embeddings' tensor (Llama-3.2, Qwen2.5, Gemma)
    trains that tensor ("a head tied to the embeddings trains both"); it trained nothing, silently."""
    from conftest import make_tiny_llama

    model = make_tiny_llama(num_layers=4, tie=tie)
    head, embed = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    assert (head is embed) == tie
    opt = GrassOptimizer(model, GrassConfig(active_layers=1, probe_steps=0, train_head=True), lr=1e-2)
    before = {"head": head.detach().clone(), "embed": embed.detach().clone()}
    x = torch.randint(0, 64, (2, 8))
    for _ in range(2):
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    assert head.requires_grad and not torch.equal(head, before["head"])
    assert torch.equal(embed, before["embed"]) != tie  # untied: train_head leaves the embeddings alone


class Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.stack = nn.ModuleDict({"blocks": nn.ModuleList([nn.Linear(8, 8) for _ in range(4)])})
        self.other = nn.ModuleList([nn.Linear(8, 8), nn.LayerNorm(8)])  # mixed classes: not blocks
        self.act = nn.ModuleList([nn.ReLU(), nn.ReLU()])
        self.out = nn.Linear(8, 10)


def test_plain_module_introspection_and_overrides():
    m = Plain()
    g = discover_layers(m)
    assert g.block_path == "stack.blocks" and g.num_layers == 4
    assert g.embeddings == [m.emb.weight]
    g2 = discover_layers(m, "other")  # override by path, even with mixed classes
    assert g2.num_layers == 2 and g2.blocks[0] is m.other[0]
    with pytest.raises(LayerDiscoveryError, match="has no parameters"):
        discover_layers(m, lambda mod: list(mod.act))
    g3 = discover_layers(m, lambda mod: list(mod.stack["blocks"])[:2])
    assert g3.num_layers == 2 and g3.block_path == "<lambda>"


def test_discovery_errors():
    with pytest.raises(LayerDiscoveryError, match="layers='nope'"):
        discover_layers(Plain(), "nope")
    with pytest.raises(LayerDiscoveryError, match="names a Linear"):
        discover_layers(Plain(), "out")
    with pytest.raises(LayerDiscoveryError, match="no repeated decoder blocks"):
        discover_layers(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))
    with pytest.raises(LayerDiscoveryError, match="allowed"):
        discover_layers(Plain(), 42)
