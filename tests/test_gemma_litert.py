"""The default model as a LiteRT-LM bundle, with the trained demo adapters (slow: pytest -m slow).

The bundle is ``lorad default-model --format litertlm`` (converted once, with the conversion
extra; skipped without the bundle and the extra). The demo adapters were trained on the same
weights for llama.cpp (``examples/train_lora/adapters``, attention q/k/v/o, rank 8): ``pirate``
is given to a LiteRT-LM context as that very GGUF, ``french`` written back as the PEFT directory
it came from (a GGUF's tensors are PEFT's, in GGUF's axis order). Their behaviour must show as
it does on llama.cpp, in one context and not in another context of the same engine.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import start_daemon
from test_gemma_adapters import ADAPTERS, CHECKS, rate

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("litert_lm") is None,
                                 reason="the LiteRT-LM runtime is not installed")]
MODULES = {"attn_q": "q_proj", "attn_k": "k_proj", "attn_v": "v_proj", "attn_output": "o_proj"}


def as_peft(gguf_adapter: Path, out: Path) -> Path:
    """A llama.cpp LoRA GGUF of attention projections as the PEFT directory it came from."""
    import gguf
    from safetensors.numpy import save_file

    reader = gguf.GGUFReader(str(gguf_adapter))
    alpha = float(reader.fields["adapter.lora.alpha"].parts[-1][0])
    tensors, rank = {}, 0
    for t in reader.tensors:
        _, layer, kind, _, part = t.name.split(".")
        data = np.array(t.data, np.float32).reshape([int(d) for d in reversed(t.shape)])
        half = "A" if part == "lora_a" else "B"
        tensors[f"base_model.model.model.layers.{layer}.self_attn.{MODULES[kind]}."
                f"lora_{half}.weight"] = data
        rank = data.shape[0] if half == "A" else rank
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": alpha,
        "target_modules": sorted(MODULES.values())}))
    return out


@pytest.fixture(scope="module")
def bundle() -> Path:
    cached = subprocess.run([sys.executable, "-m", "lorad.client.cli", "default-model",
                             "--format", "litertlm"], capture_output=True, text=True)
    if cached.returncode != 0:
        pytest.skip("the LiteRT-LM default model needs the conversion extra once "
                    f"(pip install 'lorad[litert-convert]'): {cached.stderr.strip()}")
    return Path(cached.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_a_demo_adapter_behaves_on_litert_as_on_llama_cpp(
        tmp_path_factory: pytest.TempPathFactory, bundle: Path, name: str) -> None:
    root = tmp_path_factory.mktemp("gemma-litert")
    # pirate as the very GGUF llama.cpp loads, french as the PEFT directory it was made from
    adapter = ADAPTERS / f"{name}.gguf" if name == "pirate" else \
        as_peft(ADAPTERS / f"{name}.gguf", root / f"{name}-peft")
    d = start_daemon(root, [bundle.parent, root, ADAPTERS])
    try:
        with d.client(timeout=120) as c:
            c.load_model(str(bundle), alias="gemma")
            with c.create_context("gemma", loras=[str(adapter)]) as tuned, \
                    c.create_context("gemma") as plain:
                with_adapter, without = rate(tuned, CHECKS[name]), rate(plain, CHECKS[name])
                tuned.clear_loras()
                cleared = rate(tuned, CHECKS[name])
    finally:
        assert d.stop() == 0, d.log()
    print(f"\n{name} on LiteRT-LM: {with_adapter:.0%} with it, {without:.0%} in another "
          f"context, {cleared:.0%} after clear_loras")
    assert with_adapter >= 0.8, with_adapter
    assert without <= 0.1 and cleared <= 0.1, (without, cleared)
