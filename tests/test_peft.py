"""PEFT adapters through lorad: a LoRA saved by the ``peft`` library itself, on a tiny Hugging
Face llama whose weights are copied from the tiny GGUF model, gives through the daemon the same
greedy tokens and top log-probabilities (to 1e-3) as the PEFT model in torch.

That is the proof that the tensor-name mapping, the q/k row permutation and the alpha/rank
scaling of the conversion are right.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import tinymodels
from conftest import DaemonProcess, start_daemon
from lorad.client import Client, LoraUnsupported

torch = pytest.importorskip("torch", reason="the peft extra (torch, transformers, peft)")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

N_EMBD, N_HEAD, N_HEAD_KV, N_LAYER, N_FF = 64, 4, 2, 2, 128
EXACT = {"n_ctx": 256, "kv_type": "f32", "flash_attn": False}
PROMPT_IDS = [1, 300, 310, 320, 330, 340, 350, 360]
N = 12


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of llama.cpp's q/k row permutation: GGUF layout back to Hugging Face's."""
    return (w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def hf_llama(tensors: dict[str, np.ndarray], n_vocab: int):
    config = transformers.LlamaConfig(
        vocab_size=n_vocab, hidden_size=N_EMBD, intermediate_size=N_FF,
        num_hidden_layers=N_LAYER, num_attention_heads=N_HEAD, num_key_value_heads=N_HEAD_KV,
        rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=512,
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    state = {"model.embed_tokens.weight": tensors["token_embd.weight"],
             "model.norm.weight": tensors["output_norm.weight"],
             "lm_head.weight": tensors["output.weight"]}
    for i in range(N_LAYER):
        g, h = f"blk.{i}.", f"model.layers.{i}."
        state |= {
            h + "input_layernorm.weight": tensors[g + "attn_norm.weight"],
            h + "self_attn.q_proj.weight": unpermute(tensors[g + "attn_q.weight"], N_HEAD),
            h + "self_attn.k_proj.weight": unpermute(tensors[g + "attn_k.weight"], N_HEAD_KV),
            h + "self_attn.v_proj.weight": tensors[g + "attn_v.weight"],
            h + "self_attn.o_proj.weight": tensors[g + "attn_output.weight"],
            h + "post_attention_layernorm.weight": tensors[g + "ffn_norm.weight"],
            h + "mlp.gate_proj.weight": tensors[g + "ffn_gate.weight"],
            h + "mlp.up_proj.weight": tensors[g + "ffn_up.weight"],
            h + "mlp.down_proj.weight": tensors[g + "ffn_down.weight"],
        }
    missing, unexpected = model.load_state_dict(
        {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return model


@torch.no_grad()
def torch_greedy(model, ids: list[int], n: int) -> tuple[list[int], list[list[tuple[int, float]]]]:
    ids = list(ids)
    tokens, logprobs = [], []
    for _ in range(n):
        logits = model(torch.tensor([ids])).logits[0, -1].double()
        lp = torch.log_softmax(logits, dim=-1)
        top = torch.topk(lp, 5)
        logprobs.append([(int(t), float(v)) for v, t in zip(top.values, top.indices,
                                                               strict=True)])
        tok = int(lp.argmax())
        tokens.append(tok)
        ids.append(tok)
    return tokens, logprobs


def lorad_greedy(ctx, **params) -> tuple[list[int], list]:
    stream = ctx.generate(tokens=PROMPT_IDS, max_tokens=N, temperature=0, logprobs=5, **params)
    chunks = list(stream)
    return ([t for c in chunks for t in c.token_ids],
            [lp for c in chunks for lp in c.logprobs or []])


def assert_close(got, want) -> None:
    assert got[0] == want[0]
    for a, b in zip(got[1], want[1], strict=True):
        assert [t for t, _ in a] == [t for t, _ in b]
        assert max(abs(x[1] - y[1]) for x, y in zip(a, b, strict=True)) <= 1e-3


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("peft")
    tensors = tinymodels.tiny_llama_tensors(seed=0)
    gguf_path = tinymodels.write_tiny_llama(root / "tiny.gguf", seed=0)
    n_vocab = tensors["token_embd.weight"].shape[0]
    base = hf_llama(tensors, n_vocab)
    torch.manual_seed(0)
    config = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, lora_dropout=0.0,
                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj",
                                             "down_proj"])
    tuned = peft.get_peft_model(hf_llama(tensors, n_vocab), config).eval()
    adapter_dir = root / "adapters" / "tiny-peft"
    tuned.save_pretrained(str(adapter_dir))
    return {"root": root, "gguf": gguf_path, "base": base, "tuned": tuned,
            "adapter": adapter_dir}


@pytest.fixture(scope="module")
def peft_daemon(tmp_path_factory: pytest.TempPathFactory, setup) -> DaemonProcess:
    workdir = tmp_path_factory.mktemp("peft-daemon")
    cache = workdir / "peft-cache"
    config = workdir / "lorad.toml"
    config.write_text(f'peft_cache_dir = "{cache}"\n')
    d = start_daemon(workdir, [setup["root"]], "--config", str(config), "--adapter-dir",
                     str(setup["root"] / "adapters"))
    yield d
    assert d.stop() == 0, d.log()


def test_peft_adapter_through_lorad_equals_peft_in_torch(peft_daemon, setup) -> None:
    base_expected = torch_greedy(setup["base"], PROMPT_IDS, N)
    tuned_expected = torch_greedy(setup["tuned"], PROMPT_IDS, N)
    assert base_expected[0] != tuned_expected[0]  # the adapter changes the output
    with Client(peft_daemon.endpoint) as c, c.create_context(setup["gguf"], **EXACT) as ctx:
        # The base models agree: the weight copy (and the q/k unpermutation) is right.
        assert_close(lorad_greedy(ctx), base_expected)
        stack = ctx.set_lora(setup["adapter"])  # the PEFT directory itself
        assert stack[0]["rank"] == 4 and stack[0]["n_targets"] == 6 * N_LAYER
        assert_close(lorad_greedy(ctx), tuned_expected)
        ctx.clear_loras()
        assert_close(lorad_greedy(ctx), base_expected)
        # By name, from the adapter directory; converted once (cached by content).
        ctx.set_lora("tiny-peft")
        assert_close(lorad_greedy(ctx), tuned_expected)
        report = c.validate_lora(ctx.model, setup["adapter"])
        assert report["compatible"] and report["resolved"].endswith(".gguf")
        assert len(list((peft_daemon.workdir / "peft-cache").glob("*.gguf"))) == 1


def test_lorad_lora_convert_offline(setup, tmp_path: Path) -> None:
    out = tmp_path / "converted.gguf"
    done = subprocess.run([sys.executable, "-m", "lorad.client.cli", "lora", "convert",
                           str(setup["adapter"]), "--model", str(setup["gguf"]), "-o", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    from lorad.daemon.lora import ModelTensors, incompatibilities, inspect_adapter

    info = inspect_adapter(out)
    assert info.architecture == "llama" and len(info.targets) == 6 * N_LAYER
    assert incompatibilities(info, ModelTensors.read(setup["gguf"])) == []


@pytest.mark.parametrize(("change", "reason"), [
    ({"use_dora": True}, "dora"),
    ({"fan_in_fan_out": True}, "fan_in_fan_out"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"peft_type": "IA3"}, "not_lora"),
])
def test_unsupported_peft_adapters_are_refused(peft_daemon, setup, tmp_path: Path, change,
                                               reason) -> None:
    bad = setup["root"] / f"bad-{reason}"
    bad.mkdir(exist_ok=True)
    config = json.loads((setup["adapter"] / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**config, **change}))
    (bad / "adapter_model.safetensors").write_bytes(
        (setup["adapter"] / "adapter_model.safetensors").read_bytes())
    with Client(peft_daemon.endpoint) as c, c.create_context(setup["gguf"], n_ctx=64) as ctx:
        with pytest.raises(LoraUnsupported) as err:
            ctx.set_lora(bad)
        assert err.value.details["reason"] == reason
        assert ctx.loras() == []
