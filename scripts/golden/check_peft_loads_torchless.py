"""An adapter written by torchless, loaded by PEFT on the same base, reproduces torchless's
logits: this script trains a short QLoRA run with build/torchless-train on models/tiny,
loads the adapter with PeftModel.from_pretrained on the bf16 base (computed in fp32), and
records PEFT's logits with the adapter in tests/golden/peft_roundtrip/. The C++ test
PeftRoundTrip.TorchlessAdapterInPeftGivesTheSameLogits recomputes them from the same files.

  python scripts/golden/check_peft_loads_torchless.py     (after bash scripts/build.sh)
"""
import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import peft
import safetensors.torch
import torch
from peft import PeftModel
from transformers import Gemma4ForCausalLM

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "golden" / "peft_roundtrip"


def main():
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        lines = (ROOT / "data/demo/heal.jsonl").read_text().splitlines()[:32]
        (tmp / "data.jsonl").write_text("\n".join(lines) + "\n")
        (tmp / "heal.yaml").write_text(
            f"base_model: {ROOT / 'models/tiny'}\nadapter: qlora\nlora_r: 4\nlora_alpha: 8\n"
            "datasets:\n  - path: data.jsonl\n    type: chat\nsequence_len: 128\nmicro_batch_size: 4\n"
            "max_steps: 4\nlearning_rate: 1.0e-2\nwarmup_steps: 0\nseed: 3\noutput_dir: out\n")
        subprocess.run([str(ROOT / "build/torchless-train"), "--config", str(tmp / "heal.yaml")], check=True,
                       stdout=subprocess.DEVNULL)
        adapter = tmp / "out"
        base = Gemma4ForCausalLM.from_pretrained(str(ROOT / "models/tiny"), dtype=torch.float32).eval()
        model = PeftModel.from_pretrained(base, str(adapter)).eval()
        ids = (torch.arange(2 * 40).reshape(2, 40) * 37 + 5) % base.config.vocab_size
        ids[:, 0] = 2
        with torch.no_grad():
            logits = model(input_ids=ids).logits.float()
        with model.disable_adapter(), torch.no_grad():
            no_adapter = model(input_ids=ids).logits.float()
        delta = (logits - no_adapter).abs().max().item()
        assert delta > 1e-3, f"the adapter changes nothing ({delta}); train longer"
        shutil.rmtree(OUT, ignore_errors=True)
        OUT.mkdir(parents=True)
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.copy(adapter / f, OUT / f)
        safetensors.torch.save_file({"input_ids": ids.contiguous(), "logits": logits.contiguous()},
                                    str(OUT / "logits.safetensors"), metadata={"format": "pt"})
        (OUT / "VERSIONS.json").write_text(json.dumps(
            {"torch": torch.__version__, "peft": peft.__version__, "adapter_effect_max_abs": delta}, indent=2) + "\n")
        print(f"PEFT loaded the torchless adapter; adapter moves logits by up to {delta:.3g}")


if __name__ == "__main__":
    main()
