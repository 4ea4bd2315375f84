"""Models made into LiteRT-LM bundles (``.litertlm``), offline, with the conversion extra.

Needs ``pip install 'lorad[litert-convert]'`` (PyTorch, litert-torch and the bundle builder,
about 2.3 GB): never the daemon. Two models come out of here:

- :func:`gemma3_from_gguf`: gemma 3 270M from a GGUF file (the default model): its tensors are
  dequantized with ``gguf``, named as Hugging Face names them, the ``+1`` llama.cpp's converter
  adds to every norm weight is taken back, and litert-torch's gemma 3 decoder is exported with
  int8 weights (or f32). The tokenizer is a SentencePiece model rebuilt from the GGUF's
  vocabulary.
- :func:`tiny`: a 2-layer model of 256 tokens for the fast test suite (sub-MB): random weights
  whose output head is a permutation of the embedding, so greedy output walks through varied
  tokens, deterministically; :func:`fixtures` writes it with an adapter and the model with
  that adapter merged (``tests/fixtures``).

Both export the ``prefill_N``/``decode`` signatures with the KV layout and mask input the
runtime takes (its default layout gives files it refuses: "Input token ids are too long"), and
those same signatures take the LoRA inputs (rank 16 by default; see
:mod:`lorad.daemon.litert_lora`, whose spec goes into the bundle's system metadata).
"""

from __future__ import annotations

import importlib.machinery
import json
import os
import sys
import tempfile
import types
from pathlib import Path
from typing import Any

from .litert_lora import MARKER, LoraSpec

TINY_VOCAB = 256
TINY_CORPUS = (
    "lorad is a local LLM runtime daemon. One process hosts the models and serves many "
    "client processes over ZeroMQ and an OpenAI-compatible HTTP door. Every context owns its "
    "adapter stack, queue, cancellation and streaming state. Apps share one daemon and one "
    "copy of the weights, and swap small adapters live. The quick brown fox jumps over the "
    "lazy dog. 0123456789 ,.;:!?()[]{}<>+-*/=_'\"#@$%&|~^`\n"
) * 4
"""The text the tiny model's tokenizer is trained on (fixed: the fixture must not depend on
any file of the project)."""


class MissingExtra(RuntimeError):
    """The conversion extra is not installed."""


def _imports() -> dict[str, Any]:
    """litert-torch's modules. Its LoRA layer imports ``tensorflow.lite``'s flatbuffer schema,
    which ``ai_edge_litert`` ships under another name: alias it (PyTorch's dynamo first, which
    probes for tensorflow and must not find these stubs)."""
    try:
        import torch
        import torch._dynamo
        from ai_edge_litert import schema_py_generated as schema
    except ImportError as exc:
        raise MissingExtra(f"converting to .litertlm needs the conversion extra ({exc.name} "
                           "is missing): pip install 'lorad[litert-convert]'") from None
    for name in ("tensorflow", "tensorflow.lite", "tensorflow.lite.python"):
        if name not in sys.modules:
            module = types.ModuleType(name)
            module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
            module.__path__ = []
            sys.modules[name] = module
    sys.modules["tensorflow.lite.python.schema_py_generated"] = schema
    sys.modules["tensorflow.lite.python"].schema_py_generated = schema  # type: ignore[attr-defined]
    try:
        from litert_torch.generative.examples.gemma3 import decoder
        from litert_torch.generative.layers import kv_cache
        from litert_torch.generative.utilities import converter, export_config, litertlm_builder
    except ImportError as exc:
        raise MissingExtra(f"converting to .litertlm needs the conversion extra ({exc.name} "
                           "is missing): pip install 'lorad[litert-convert]'") from None
    return {"torch": torch, "decoder": decoder, "kv_cache": kv_cache, "converter": converter,
            "export_config": export_config, "builder": litertlm_builder}


def lora_spec(config: Any, rank: int) -> LoraSpec:
    """The LoRA inputs of a gemma 3 decoder of ``config`` at ``rank``: one KV head only (the
    runtime's LoRA shapes do not fit grouped heads of several)."""
    attn = config.block_config(0).attn_config
    if attn.num_query_groups != 1:
        raise ValueError(f"LoRA inputs need one KV head (this model has "
                         f"{attn.num_query_groups})")
    if rank not in (16, 32):
        raise ValueError("the runtime takes LoRA ranks 16 and 32 on the CPU")
    return LoraSpec(rank=rank, n_layer=config.num_layers, d_model=config.embedding_dim,
                    q_out=attn.num_heads * attn.head_dim, kv_out=attn.head_dim)


def _with_lora(m: dict[str, Any], decoder: Any) -> Any:
    """``decoder`` as a module whose forward takes ``lora`` (litert-torch's gemma 3 decoder
    takes none): each block hands its layer's entry to its attention, which applies it."""
    torch, g3 = m["torch"], m["decoder"]

    class Block(g3.DecoderBlock):
        lora = None

        def forward(self, x, rope=None, mask=None, input_pos=None, kv_cache=None):  # type: ignore[no-untyped-def]
            attn_out, kv = self.atten_func(self.pre_atten_norm(x), rope, mask, input_pos,
                                           kv_cache, self.lora)
            x = x + self.post_atten_norm(attn_out)
            return x + self.ff(x), kv

    class WithLora(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.decoder = decoder
            for block in decoder.transformer_blocks:
                block.__class__ = Block

        def forward(self, tokens, input_pos, kv_cache, mask=None, lora=None,  # type: ignore[no-untyped-def]
                    export_config=None):
            blocks = self.decoder.transformer_blocks
            for i, block in enumerate(blocks):
                block.lora = lora.adapters[i] if lora is not None else None
            try:
                return self.decoder(tokens, input_pos, kv_cache, mask=mask,
                                    export_config=export_config)
            finally:
                for block in blocks:
                    block.lora = None

    return WithLora()


def _export(m: dict[str, Any], model: Any, config: Any, work: str, name: str, *,
            prefill: int, kv: int, quantize: str, lora_rank: int | None) -> str:
    """The model as a .tflite file in ``work`` with the two signatures the runtime calls,
    ``prefill_{prefill}`` and ``decode``, which take the LoRA inputs when ``lora_rank`` is
    given (the stock exporter puts them in other signatures, which the runtime never calls)."""
    from litert_torch._convert import interface
    from litert_torch.generative.layers import lora as lora_utils

    cv, kv_utils, torch = m["converter"], m["kv_cache"], m["torch"]
    ec = m["export_config"].ExportConfig(kvcache_layout=kv_utils.KV_LAYOUT_TRANSPOSED,
                                         mask_as_input=True)
    module = _with_lora(m, model) if lora_rank else model
    mod = cv.ExportableModule(module, export_config=ec).eval()
    extra = {"lora": lora_utils.LoRA.zeros(lora_rank, config)} if lora_rank else {}
    conv = interface.Converter()
    for signature, n in ((f"prefill_{prefill}", prefill), ("decode", 1)):
        conv.add_signature(signature, mod, sample_kwargs={
            "tokens": torch.zeros((1, n), dtype=torch.int),
            "input_pos": torch.arange(n, dtype=torch.int),
            "kv_cache": kv_utils.KVCache.from_model_config(kv, config,
                                                           kv_layout=ec.kvcache_layout),
            "mask": cv._build_mask(n, kv, config.causal_mask_value), **extra})
    edge = conv.convert(quant_config=cv.get_quant_recipe_from_flag(quantize, config))
    path = f"{work}/{name}.tflite"
    edge.export(path)
    return path


def _bundle(m: dict[str, Any], tflite: str, tokenizer: str, work: str, out: Path, *, kv: int,
            bos: int, eos: list[int], template: str | None, spec: LoraSpec | None) -> Path:
    builder_module = m["builder"].litertlm_builder
    stock = builder_module.LitertLmFileBuilder

    class Builder(stock):  # type: ignore[misc, valid-type]
        """The stock builder, with the LoRA spec in the system metadata (see litert_lora)."""

        def __init__(self) -> None:
            super().__init__()
            if spec is not None:
                self.add_system_metadata(builder_module.Metadata(
                    key="lorad_lora", value=MARKER.decode() + spec.to_json(),
                    dtype=builder_module.DType.STRING))

    builder_module.LitertLmFileBuilder = Builder
    try:
        m["builder"].build_litertlm(
            tflite, work, work, context_length=kv, tokenizer_model_path=tokenizer,
            start_token_id=bos, stop_token_ids=eos, llm_model_type="generic",
            jinja_prompt_template=template)
    finally:
        builder_module.LitertLmFileBuilder = stock
    built = Path(work) / (Path(tflite).stem + ".litertlm")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    os.replace(built, tmp) if built.stat().st_dev == out.parent.stat().st_dev else \
        tmp.write_bytes(built.read_bytes())
    os.replace(tmp, out)
    return out


TINY_ATTENTION_SCALE = 10.0
"""The tiny model's post-attention norm scale: large enough that attention (and so an attention
LoRA) changes its greedy output, which the permuted head otherwise decides alone."""


def _tiny_model(m: dict[str, Any]) -> tuple[Any, Any]:
    """The fast suite's model in PyTorch (see the module), and its config."""
    torch, g3 = m["torch"], m["decoder"]
    config = g3.get_decoder_config_270m()
    config.vocab_size, config.num_layers, config.max_seq_len = TINY_VOCAB, 2, 256
    config.embedding_dim, config.embedding_scale = 64, 64**0.5
    config.block_configs = config.block_configs[:2]
    for block in config.block_configs:
        block.attn_config.num_heads, block.attn_config.head_dim = 2, 32
        block.attn_config.sliding_window_size = 64
        block.ff_config.intermediate_size = 128
    torch.manual_seed(0)
    model = g3.Decoder(config, 0).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.zeros_like(p) if "norm" in name else torch.randn_like(p) * 0.02)
        for block in model.transformer_blocks:  # zero-centred: the scale is 1 + weight
            block.post_atten_norm.weight.fill_(TINY_ATTENTION_SCALE - 1)
        embedding = torch.randn(TINY_VOCAB, 64)
        model.tok_embedding.weight.copy_(embedding)
        # An untied head that maps each token to another: varied greedy text.
        model.lm_head.weight = torch.nn.Parameter(
            embedding[torch.randperm(TINY_VOCAB)].clone())
    return model, config


def _tiny_tokenizer(work: str) -> str:
    import sentencepiece as spm

    corpus = Path(work) / "corpus.txt"
    corpus.write_text(TINY_CORPUS)
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=f"{work}/tok", vocab_size=TINY_VOCAB,
        model_type="bpe", character_coverage=1.0, pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        user_defined_symbols=["<start_of_turn>", "<end_of_turn>"], minloglevel=2,
        num_threads=1)
    return f"{work}/tok.model"


def tiny(out: Path, *, lora_rank: int | None = 16, peft: Path | None = None) -> Path:
    """The fast suite's model: see the module; it takes LoRA inputs of ``lora_rank`` (None:
    none). With ``peft``, that adapter merged into its weights (PEFT's arithmetic), to check
    the runtime's LoRA against. Deterministic for a given PyTorch build."""
    m = _imports()
    with tempfile.TemporaryDirectory(prefix="lorad-tiny-") as work:
        model, config = _tiny_model(m)
        if peft is not None:
            _merge_peft(m, model, peft)
        tflite = _export(m, model, config, work, "tiny", prefill=32, kv=256, quantize="none",
                         lora_rank=lora_rank)
        spec = lora_spec(config, lora_rank) if lora_rank else None
        return _bundle(m, tflite, _tiny_tokenizer(work), work, out, kv=256, bos=2, eos=[1],
                       template=None, spec=spec)


def tiny_peft(out: Path, *, rank: int = 4, alpha: float = 8.0, seed: int = 1) -> Path:
    """A PEFT adapter directory for the tiny model: every attention projection of both
    layers, random (numpy and safetensors only)."""
    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    dims = {"q_proj": (64, 64), "k_proj": (64, 32), "v_proj": (64, 32), "o_proj": (64, 64)}
    tensors = {}
    for layer in range(2):
        for module, (d_in, d_out) in dims.items():
            key = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{key}.lora_A.weight"] = rng.normal(0, 0.5, (rank, d_in)).astype("f4")
            tensors[f"{key}.lora_B.weight"] = rng.normal(0, 0.5, (d_out, rank)).astype("f4")
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": alpha, "task_type": "CAUSAL_LM",
        "target_modules": list(dims)}, indent=1))
    return out


def _merge_peft(m: dict[str, Any], model: Any, peft: Path) -> None:
    """Add a PEFT adapter to the decoder's weights as PEFT defines it: ``W += alpha / r * B A``
    (litert-torch keeps q, k and v in one matrix, in that order: one KV head)."""
    from safetensors.numpy import load_file

    torch = m["torch"]
    config = json.loads((peft / "adapter_config.json").read_text())
    factor = config["lora_alpha"] / config["r"]
    raw = load_file(str(peft / "adapter_model.safetensors"))
    with torch.no_grad():
        for i, block in enumerate(model.transformer_blocks):
            delta = {}
            for module in ("q_proj", "k_proj", "v_proj", "o_proj"):
                key = f"base_model.model.model.layers.{i}.self_attn.{module}"
                a, b = raw[f"{key}.lora_A.weight"], raw[f"{key}.lora_B.weight"]
                delta[module] = torch.from_numpy(factor * (b @ a))
            block.atten_func.qkv_projection.weight += torch.cat(
                [delta["q_proj"], delta["k_proj"], delta["v_proj"]], 0)
            block.atten_func.output_projection.weight += delta["o_proj"]


_GGUF_TO_HF = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "post_attention_norm": "post_attention_layernorm", "ffn_norm": "pre_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    "post_ffw_norm": "post_feedforward_layernorm",
}


def _gguf_tensors(reader: Any, torch: Any) -> dict[str, Any]:
    """The GGUF's tensors under Hugging Face's gemma 3 names, dequantized to float32, with the
    ``+1`` llama.cpp adds to gemma's norm weights taken back."""
    from gguf.quants import dequantize

    out = {}
    for t in reader.tensors:
        data = dequantize(t.data, t.tensor_type).reshape([int(d) for d in reversed(t.shape)])
        name = t.name.removesuffix(".weight")
        if name == "token_embd":
            hf = "model.embed_tokens"
        elif name == "output_norm":
            hf = "model.norm"
        else:
            _, layer, kind = name.split(".", 2)
            hf = f"model.layers.{layer}.{_GGUF_TO_HF[kind]}"
        tensor = torch.from_numpy(data.astype("float32").copy())
        if hf.endswith("norm"):
            tensor = tensor - 1.0
        out[hf + ".weight"] = tensor
    return out


def _sentencepiece_from_gguf(reader: Any, path: str) -> None:
    """A SentencePiece model of the GGUF's vocabulary (gemma's: BPE with byte fallback, no
    dummy prefix). ``<unk>``, which the GGUF marks as a control token, is typed UNKNOWN (the
    runtime refuses a model without one); the other control tokens but pad, start and end are
    typed user-defined, so that a chat template's turn markers written in the prompt are read
    as the tokens they are (SentencePiece never reads a control token in text), as llama.cpp
    does."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    def field(key: str) -> list[Any]:
        f = reader.fields[key]
        return [f.parts[i] for i in f.data]

    tokens = [bytes(p).decode("utf-8") for p in field("tokenizer.ggml.tokens")]
    scores = [float(p[0]) for p in field("tokenizer.ggml.scores")]
    types_ = [int(p[0]) for p in field("tokenizer.ggml.token_type")]
    unk = int(reader.fields["tokenizer.ggml.unknown_token_id"].parts[-1][0])
    proto = pb.ModelProto()
    proto.trainer_spec.model_type = pb.TrainerSpec.BPE
    proto.trainer_spec.vocab_size = len(tokens)
    proto.trainer_spec.byte_fallback = True
    proto.trainer_spec.unk_id, proto.trainer_spec.bos_id = unk, 2
    proto.trainer_spec.eos_id, proto.trainer_spec.pad_id = 1, 0
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = False
    proto.normalizer_spec.remove_extra_whitespaces = False
    specials = {0, 1, 2, unk}  # pad, end, start, unknown
    for i, (text, score, kind) in enumerate(zip(tokens, scores, types_, strict=True)):
        piece = proto.pieces.add()
        piece.piece, piece.score = text, score
        if i == unk:
            kind = pb.ModelProto.SentencePiece.UNKNOWN
        elif kind == pb.ModelProto.SentencePiece.CONTROL and i not in specials:
            kind = pb.ModelProto.SentencePiece.USER_DEFINED  # read in text: <start_of_turn>
        piece.type = kind
    Path(path).write_bytes(proto.SerializeToString())


def gemma3_from_gguf(gguf_path: Path, out: Path, *, prefill: int = 128, kv: int = 1024,
                     quantize: str = "dynamic_int8", template: str | None = None,
                     lora_rank: int | None = 16) -> Path:
    """Gemma 3 270M from its GGUF file as a ``.litertlm`` (see the module): ``prefill`` tokens
    per prefill call, a KV cache of ``kv`` tokens (the bundle's context), LoRA inputs of
    ``lora_rank`` (None: none)."""
    m = _imports()
    import gguf

    reader = gguf.GGUFReader(str(gguf_path))
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    blocks = int(reader.fields.get(f"{arch}.block_count").parts[-1][0])
    width = int(reader.fields.get(f"{arch}.embedding_length").parts[-1][0])
    if arch != "gemma3" or blocks != 18 or width != 640:
        raise ValueError(f"{gguf_path}: only gemma 3 270M converts (found {arch}, {blocks} "
                         f"layers of {width})")
    with tempfile.TemporaryDirectory(prefix="lorad-litertlm-") as work:
        tensors = _gguf_tensors(reader, m["torch"])
        model = m["decoder"].build_model_270m("gguf", custom_loader=lambda _path: tensors)
        config = m["decoder"].get_decoder_config_270m()
        tflite = _export(m, model, config, work, "gemma3-270m", prefill=prefill, kv=kv,
                         quantize=quantize, lora_rank=lora_rank)
        tokenizer = f"{work}/tokenizer.model"
        _sentencepiece_from_gguf(reader, tokenizer)
        return _bundle(m, tflite, tokenizer, work, out, kv=kv, bos=2, eos=[1, 106],
                       template=template,
                       spec=lora_spec(config, lora_rank) if lora_rank else None)


def fixtures(directory: Path) -> list[Path]:
    """The fast suite's files: ``tiny.litertlm`` (LoRA inputs of rank 16), ``tiny-peft/`` (a
    rank-4 adapter of every attention projection) and ``tiny-merged.litertlm`` (that adapter
    merged into the weights, no LoRA inputs)."""
    peft = tiny_peft(directory / "tiny-peft")
    return [tiny(directory / "tiny.litertlm"), peft,
            tiny(directory / "tiny-merged.litertlm", lora_rank=None, peft=peft)]


def main(argv: list[str] | None = None) -> int:
    """``python -m lorad.daemon.litertlm_convert fixtures DIR`` or ``gemma GGUF OUT``."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) == 2 and args[0] == "fixtures":
        for path in fixtures(Path(args[1])):
            print(path)
    elif len(args) == 3 and args[0] == "gemma":
        print(gemma3_from_gguf(Path(args[1]), Path(args[2])))
    else:
        print("usage: python -m lorad.daemon.litertlm_convert fixtures DIR | gemma GGUF OUT",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
