"""PEFT adapters through lorad: a LoRA saved by the ``peft`` library itself, on a tiny Hugging
Face llama whose weights are copied from the tiny GGUF model, gives through the daemon the same
greedy tokens and top log-probabilities (to 1e-3) as the PEFT model in torch.

That is the proof that the tensor-name mapping, the q/k row permutation and the alpha/rank
scaling of the conversion are right. Each PEFT feature is checked the same way: rsLoRA,
``rank_pattern`` / ``alpha_pattern`` (regular expressions, first matching key wins), ``lora_alpha
= 0``, LoRAs of ``embed_tokens`` and ``lm_head`` (on llama, and on gemma3, whose embeddings are
scaled by ``sqrt(n_embd)``), and the refusal of embedding/output LoRAs on a model whose output
layer is its token embedding. The reference is always PEFT loading the saved directory
(``PeftModel.from_pretrained``), i.e. what the directory means to PEFT.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import tinymodels
from conftest import DaemonProcess, start_daemon
from lorad.client import Client, LoraInvalid, LoraUnsupported

torch = pytest.importorskip("torch", reason="the peft extra (torch, transformers, peft)")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

N_EMBD, N_HEAD, N_HEAD_KV, N_LAYER, N_FF = 64, 4, 2, 2, 128
EXACT = {"n_ctx": 256, "kv_type": "f32", "flash_attn": False}
PROMPT_IDS = [1, 300, 310, 320, 330, 340, 350, 360]
N = 12
LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


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


def far_apart(got, want) -> bool:
    """Other greedy tokens, or top logprobs that differ by far more than the 1e-3 tolerance."""
    if got[0] != want[0]:
        return True
    return max(abs(x[1] - y[1]) for a, b in zip(got[1], want[1], strict=True)
               for x, y in zip(a, b, strict=True)) > 2e-2


class GgmlGelu(torch.nn.Module):
    """ggml's CPU GELU: the tanh approximation looked up in an f16 table (input and output
    rounded to f16; identity above 10, 0 below -10). Gemma's ``gelu_pytorch_tanh`` computed
    this way, so that the base models agree to ~1e-5 instead of ~5e-3."""

    def forward(self, x):
        y = torch.nn.functional.gelu(x.half().float(), approximate="tanh").half().float()
        return torch.where(x <= -10, torch.zeros_like(x), torch.where(x >= 10, x, y))


def hf_gemma3(tensors: dict[str, np.ndarray], n_vocab: int, tied: bool):
    """Hugging Face's gemma3 with the weights of :func:`tinymodels.write_tiny_gemma3`."""
    head_dim = N_EMBD // N_HEAD
    config = transformers.Gemma3TextConfig(
        vocab_size=n_vocab, hidden_size=N_EMBD, intermediate_size=N_FF, num_hidden_layers=N_LAYER,
        num_attention_heads=N_HEAD, num_key_value_heads=N_HEAD_KV, head_dim=head_dim,
        query_pre_attn_scalar=head_dim, rms_norm_eps=1e-6,
        layer_types=["full_attention"] * N_LAYER,
        rope_parameters={kind: {"rope_type": "default", "rope_theta": 10000.0}
                         for kind in ("full_attention", "sliding_attention")},
        max_position_embeddings=512, tie_word_embeddings=tied, pad_token_id=0,
    )
    model = transformers.Gemma3ForCausalLM(config).eval()

    def norm(name: str) -> np.ndarray:  # GGUF stores 1 + w
        return tensors[name] - np.float32(1)

    state = {"model.embed_tokens.weight": tensors["token_embd.weight"],
             "model.norm.weight": norm("output_norm.weight")}
    if not tied:
        state["lm_head.weight"] = tensors["output.weight"]
    for i in range(N_LAYER):
        g, h = f"blk.{i}.", f"model.layers.{i}."
        state |= {
            h + "input_layernorm.weight": norm(g + "attn_norm.weight"),
            h + "self_attn.q_proj.weight": tensors[g + "attn_q.weight"],
            h + "self_attn.k_proj.weight": tensors[g + "attn_k.weight"],
            h + "self_attn.v_proj.weight": tensors[g + "attn_v.weight"],
            h + "self_attn.o_proj.weight": tensors[g + "attn_output.weight"],
            h + "self_attn.q_norm.weight": norm(g + "attn_q_norm.weight"),
            h + "self_attn.k_norm.weight": norm(g + "attn_k_norm.weight"),
            h + "post_attention_layernorm.weight": norm(g + "post_attention_norm.weight"),
            h + "pre_feedforward_layernorm.weight": norm(g + "ffn_norm.weight"),
            h + "post_feedforward_layernorm.weight": norm(g + "post_ffw_norm.weight"),
            h + "mlp.gate_proj.weight": tensors[g + "ffn_gate.weight"],
            h + "mlp.up_proj.weight": tensors[g + "ffn_up.weight"],
            h + "mlp.down_proj.weight": tensors[g + "ffn_down.weight"],
        }
    missing, unexpected = model.load_state_dict(
        {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}, strict=False)
    assert not unexpected and set(missing) <= ({"lm_head.weight"} if tied else set()), missing
    for layer in model.model.layers:
        layer.mlp.act_fn = GgmlGelu()
    return model


@dataclass
class Base:
    """A tiny GGUF model and a maker of the same model in torch."""

    gguf: Path
    make: Callable[[], torch.nn.Module]


def save_adapter(base: Base, directory: Path, *, rewrite: dict | None = None, **config):
    """Train-free PEFT adapter: random LoRA weights saved by PEFT into ``directory``, with
    ``rewrite`` applied to its ``adapter_config.json`` afterwards (keys in the given order).
    Returns PEFT's model for the saved directory (the reference)."""
    torch.manual_seed(0)
    config = {"r": 4, "lora_alpha": 8, "init_lora_weights": False, "lora_dropout": 0.0} | config
    tuned = peft.get_peft_model(base.make(), peft.LoraConfig(**config))
    tuned.save_pretrained(str(directory))
    if rewrite:
        rewrite_config(directory, rewrite)
    return peft.PeftModel.from_pretrained(base.make(), str(directory)).eval()


def rewrite_config(directory: Path, changes: dict) -> None:
    path = directory / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def peft_variant(base: Base, directory: Path, out: Path, **changes):
    """PEFT's model for ``directory``'s weights under another config (``changes``)."""
    shutil.copytree(directory, out)
    rewrite_config(out, changes)
    return peft.PeftModel.from_pretrained(base.make(), str(out)).eval()


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
    llama = Base(gguf_path, lambda: hf_llama(tensors, n_vocab))
    return {"root": root, "gguf": gguf_path, "base": base, "tuned": tuned,
            "adapter": adapter_dir, "llama": llama}


@pytest.fixture(scope="module")
def gemma(setup) -> dict[str, Base]:
    """Tiny gemma3 models: ``tied`` (no output.weight, as released) and ``untied``."""
    out = {}
    for name, tied in (("tied", True), ("untied", False)):
        tensors = tinymodels.tiny_gemma3_tensors(seed=3, tied=tied)
        path = tinymodels.write_tiny_gemma3(setup["root"] / f"gemma3-{name}.gguf", seed=3,
                                            tied=tied)
        n_vocab = tensors["token_embd.weight"].shape[0]
        out[name] = Base(path, lambda t=tensors, n=n_vocab, tied=tied: hf_gemma3(t, n, tied))
    return out


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
    ({"use_qalora": True}, "qalora"),
    ({"alora_invocation_tokens": [5, 6]}, "alora"),
    ({"trainable_token_indices": [3]}, "trainable_tokens"),
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


def through_lorad(daemon: DaemonProcess, model: Path, adapter: Path):
    with Client(daemon.endpoint) as c, c.create_context(model, **EXACT) as ctx:
        stack = ctx.set_lora(adapter)
        return lorad_greedy(ctx), stack


SCALING = {
    # id: (LoraConfig, adapter_config.json rewritten after saving, a wrong reading of it that
    # the test must tell apart). llama.cpp's convert_lora_to_gguf.py writes one lora_alpha and
    # lets llama.cpp scale each pair by alpha / its rank: it ignores rsLoRA and alpha_pattern.
    "rslora": ({"use_rslora": True}, None, {"use_rslora": False}),
    "alpha_pattern": ({"alpha_pattern": {"q_proj": 32, "down_proj": 2}}, None,
                      {"alpha_pattern": {}}),
    "alpha_pattern_regex": ({"alpha_pattern": {r"layers\.0\..*_proj": 24,
                                               r"model\.layers\.1\.mlp\.(up|down)_proj": 1}},
                            None, {"alpha_pattern": {}}),
    "rank_pattern_regex": ({"rank_pattern": {r"layers\.0\.self_attn\.[qk]_proj": 2, "v_proj": 8},
                            "alpha_pattern": {r".*\.v_proj": 4}}, None, {"alpha_pattern": {}}),
    "rslora_with_patterns": ({"use_rslora": True, "rank_pattern": {r".*\.1\.mlp\..*": 8},
                              "alpha_pattern": {"o_proj": 16}}, None,
                             {"use_rslora": False, "alpha_pattern": {}}),
    # PEFT takes the first key that matches, in the file's order (not the most specific one).
    "first_matching_key_wins": ({}, {"alpha_pattern": {"q_proj": 2,
                                                       r"layers\.1\.self_attn\.q_proj": 32}},
                                {"alpha_pattern": {r"layers\.1\.self_attn\.q_proj": 32,
                                                   "q_proj": 2}}),
    "alpha_zero": ({"lora_alpha": 0}, None, None),  # PEFT's delta is zero
    "alpha_zero_with_pattern": ({"lora_alpha": 0, "alpha_pattern": {"v_proj": 16}}, None,
                                {"alpha_pattern": {}}),
}


@pytest.mark.parametrize("case", list(SCALING))
def test_scaling_as_peft_computes_it(peft_daemon, setup, case) -> None:
    config, rewrite, wrong = SCALING[case]
    llama: Base = setup["llama"]
    adapter = setup["root"] / "cases" / case
    reference = save_adapter(llama, adapter, rewrite=rewrite, target_modules=LLAMA_LINEAR,
                             **config)
    expected = torch_greedy(reference, PROMPT_IDS, N)
    base_expected = torch_greedy(setup["base"], PROMPT_IDS, N)
    if case == "alpha_zero":
        assert_close(expected, base_expected)
    else:
        assert far_apart(expected, base_expected)
    if wrong is not None:  # a converter that read the config that way would fail below
        other = peft_variant(llama, adapter, setup["root"] / "cases" / f"{case}-wrong", **wrong)
        assert far_apart(torch_greedy(other, PROMPT_IDS, N), expected)
    got, stack = through_lorad(peft_daemon, llama.gguf, adapter)
    assert_close(got, expected)
    assert stack[0]["n_targets"] == len(LLAMA_LINEAR) * N_LAYER


@pytest.mark.parametrize("targets", [["embed_tokens"], ["lm_head"],
                                     ["embed_tokens", "lm_head", "q_proj", "down_proj"]],
                         ids=["embed_tokens", "lm_head", "both_and_linear"])
def test_embedding_and_output_loras_as_peft_computes_them(peft_daemon, setup, targets) -> None:
    from safetensors.numpy import load_file

    llama: Base = setup["llama"]
    adapter = setup["root"] / "cases" / f"llama-{'-'.join(targets)}"
    reference = save_adapter(llama, adapter, target_modules=targets, use_rslora=len(targets) > 2,
                             alpha_pattern={"embed_tokens": 1})
    saved = load_file(str(adapter / "adapter_model.safetensors"))
    # PEFT also saves the base weights of these modules; the converter skips them.
    assert {k for k in saved if k.endswith("base_layer.weight")} == {
        {"embed_tokens": "base_model.model.model.embed_tokens.base_layer.weight",
         "lm_head": "base_model.model.lm_head.base_layer.weight"}[t]
        for t in targets if t in ("embed_tokens", "lm_head")}
    expected = torch_greedy(reference, PROMPT_IDS, N)
    assert far_apart(expected, torch_greedy(setup["base"], PROMPT_IDS, N))
    got, stack = through_lorad(peft_daemon, llama.gguf, adapter)
    assert_close(got, expected)
    want = {"embed_tokens": "token_embd.weight", "lm_head": "output.weight"}
    assert {want[t] for t in targets if t in want} <= set(stack[0]["targets"])


@pytest.mark.parametrize("targets", [["embed_tokens"],
                                     ["embed_tokens", "lm_head", "q_proj", "v_proj", "down_proj"]],
                         ids=["embed_tokens", "with_lm_head_and_linear"])
def test_gemma3_embedding_lora_scaled_as_peft_scales_it(peft_daemon, gemma, setup,
                                                       targets) -> None:
    """gemma multiplies its embeddings by sqrt(n_embd) (8 here); PEFT scales the embedding
    LoRA's output by the same factor, and so does llama.cpp (it adds the delta first)."""
    untied = gemma["untied"]
    adapter = setup["root"] / "cases" / f"gemma3-{'-'.join(targets)}"
    reference = save_adapter(untied, adapter, target_modules=targets,
                             alpha_pattern={"embed_tokens": 1})
    base_expected = torch_greedy(untied.make(), PROMPT_IDS, N)
    expected = torch_greedy(reference, PROMPT_IDS, N)
    assert far_apart(expected, base_expected)
    with Client(peft_daemon.endpoint) as c, c.create_context(untied.gguf, **EXACT) as ctx:
        assert_close(lorad_greedy(ctx), base_expected)  # the base models agree
        ctx.set_lora(adapter)
        assert_close(lorad_greedy(ctx), expected)


def test_tied_embeddings_refuse_embedding_and_output_loras(peft_daemon, gemma, setup) -> None:
    """On a model whose output layer is its token embedding, attention and MLP LoRAs convert
    exactly; embed_tokens and lm_head LoRAs are refused (llama.cpp cannot apply them as PEFT
    does: see the next test), and the context goes on decoding."""
    tied = gemma["tied"]
    root = setup["root"] / "cases"
    plain = root / "gemma3-tied-linear"
    reference = save_adapter(tied, plain, target_modules=LLAMA_LINEAR, use_rslora=True,
                             alpha_pattern={r".*\.mlp\..*": 4})
    refused = {}
    for target in ("embed_tokens", "lm_head"):
        refused[target] = root / f"gemma3-tied-{target}"
        save_adapter(tied, refused[target], target_modules=[target, "q_proj"])
    base_expected = torch_greedy(tied.make(), PROMPT_IDS, N)
    expected = torch_greedy(reference, PROMPT_IDS, N)
    assert far_apart(expected, base_expected)
    with Client(peft_daemon.endpoint) as c, c.create_context(tied.gguf, **EXACT) as ctx:
        assert_close(lorad_greedy(ctx), base_expected)
        for target, adapter in refused.items():
            with pytest.raises(LoraUnsupported) as err:
                ctx.set_lora(adapter)
            assert err.value.details["reason"] == "tied_embeddings", target
            assert ctx.loras() == []
        assert_close(lorad_greedy(ctx), base_expected)
        ctx.set_lora(plain)
        assert_close(lorad_greedy(ctx), expected)


DECODE = textwrap.dedent("""
    import sys
    from llama_cpp import Llama

    llm = Llama(sys.argv[1], lora_path=sys.argv[2] if len(sys.argv) > 2 else None, n_ctx=64,
                verbose=False)
    llm.eval([1, 300, 310, 320])
    print("decoded", flush=True)
""")


def test_llama_cpp_aborts_on_a_token_embd_lora_of_a_tied_model(gemma, tmp_path: Path) -> None:
    """Why the refusal: llama.cpp looks LoRAs up by tensor name, and a tied model's output
    layer is named token_embd.weight, so it applies a token_embd LoRA at the output too, where
    the embedding layout does not fit a matrix product: the process aborts at the first decode.
    The same LoRA on the untied model decodes. (If llama.cpp changes this, this test says so.)"""
    def decode(model: Path, *lora: Path) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", DECODE, str(model), *map(str, lora)],
                              capture_output=True, text=True, timeout=120,
                              env={**os.environ, "GGML_NO_BACKTRACE": "1"})

    for name, base in gemma.items():
        lora = tinymodels.write_token_embd_lora(tmp_path / f"{name}.gguf", base.gguf)
        assert decode(base.gguf).stdout.splitlines() == ["decoded"]
        done = decode(base.gguf, lora)
        if name == "untied":
            assert done.returncode == 0 and done.stdout.splitlines() == ["decoded"], done.stderr
        else:
            assert done.returncode < 0 and "decoded" not in done.stdout.splitlines()
            assert "GGML_ASSERT(ggml_can_mul_mat(a, b))" in done.stderr, done.stderr[-2000:]


def test_a_pattern_key_that_is_no_regular_expression_is_invalid(peft_daemon, setup) -> None:
    bad = setup["root"] / "cases" / "bad-regex"
    shutil.copytree(setup["adapter"], bad)
    rewrite_config(bad, {"alpha_pattern": {"q_proj(": 4}})
    with Client(peft_daemon.endpoint) as c, c.create_context(setup["gguf"], n_ctx=64) as ctx:
        with pytest.raises(LoraInvalid) as err:
            ctx.set_lora(bad)
        assert err.value.details["field"] == "alpha_pattern"
        assert ctx.loras() == []


def test_a_peft_directory_through_the_http_door(tmp_path: Path, setup) -> None:
    """vLLM's convention with a PEFT directory: listed with its parent, chosen by ``model``."""
    import openai

    config = tmp_path / "lorad.toml"
    config.write_text(f'peft_cache_dir = "{tmp_path / "peft-cache"}"\n')
    d = start_daemon(tmp_path, [setup["root"]], "--config", str(config), "--model",
                     str(setup["gguf"]), "--alias", "tiny", "--adapter-dir",
                     str(setup["root"] / "adapters"), "--http", "127.0.0.1:0")
    try:
        url = next(json.loads(line)["http"] for line in d.log().splitlines()
                   if '"serving"' in line)
        api = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        assert {m.id: m.parent for m in api.models.list()}["tiny-peft"] == "tiny"
        got = api.completions.create(model="tiny-peft", prompt="the cat", max_tokens=8,
                                     temperature=0).choices[0].text
        with Client(d.endpoint) as c, c.create_context("tiny") as ctx:
            want = ctx.generate("the cat", max_tokens=8, temperature=0,
                                loras=[setup["adapter"]]).collect()
            base = ctx.generate("the cat", max_tokens=8, temperature=0).collect()
        assert got == want != base
    finally:
        assert d.stop() == 0, d.log()
