"""The model folder `host align` writes, opened by transformers: the weights load
with no missing or unexpected keys (also when sharded), the tokenizer loads with
AutoTokenizer and encodes as the source's does, and generation_config.json and
every config field survive unchanged. Needs torch and transformers, and builds
the host binary with cargo."""

import json
import shutil
import subprocess

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from conftest import REPO

TOKENIZERS = REPO / "tests" / "fixtures" / "tokenizers" / "qwen2"
CONVERSATIONS = [
    {"prompt": [{"role": "user", "content": "Q: 2+3"}], "chosen": [{"role": "assistant", "content": "Sure, 5!"}],
     "rejected": [{"role": "assistant", "content": "5"}]},
    {"prompt": [{"role": "user", "content": "日本語 🎉?"}], "chosen": [{"role": "assistant", "content": "Sure, はい!"}],
     "rejected": [{"role": "assistant", "content": "はい"}]},
]


@pytest.fixture(scope="module")
def host():
    subprocess.run(["cargo", "build", "-q", "-p", "host"], cwd=REPO, check=True)
    exe = REPO / "target" / "debug" / "host"
    return lambda *args: subprocess.run([str(exe), *map(str, args)], check=True, capture_output=True, text=True)


@pytest.fixture(scope="module")
def source(host, tmp_path_factory):
    """A tiny model pretrained by host, then given the Qwen2 fixture tokenizer, a
    generation config and config fields host does not read."""
    d = tmp_path_factory.mktemp("folder")
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 400, "hidden_size": 32,
        "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
        "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
    }
    (d / "config.json").write_text(json.dumps(config))
    host("pretrain", "--model-config", d / "config.json", "--builtin", "16", "--steps", "2", "--batch-size", "4",
         "--backend", "cpu", "--out", d / "pretrained")
    model = d / "pretrained" / "model"
    for f in ["tokenizer.json", "tokenizer_config.json"]:
        shutil.copy(TOKENIZERS / f, model / f)
    cfg = json.loads((model / "config.json").read_text())
    cfg.update(eos_token_id=[2, 5], pad_token_id=0, initializer_range=0.02, torch_dtype="bfloat16")
    (model / "config.json").write_text(json.dumps(cfg, indent=2))
    (model / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, 5], "temperature": 0.7}))
    data = d / "trl_conversational.jsonl"
    data.write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in CONVERSATIONS))
    return model, data, d


@pytest.mark.parametrize("max_shard_size", ["50GB", "20KB"])
def test_transformers_loads_the_aligned_folder(host, source, max_shard_size):
    model, data, d = source
    out = d / f"aligned-{max_shard_size}"
    host("align", "--model", model, "--data", data, "--steps", "2", "--batch-size", "2", "--lr", "1e-3",
         "--backend", "cpu", "--out", out, "--max-shard-size", max_shard_size)
    written = out / "model"
    assert (written / "model.safetensors.index.json").exists() == (max_shard_size == "20KB")

    loaded, info = AutoModelForCausalLM.from_pretrained(written, output_loading_info=True)
    assert not info["missing_keys"], info
    assert not info["unexpected_keys"], info
    assert next(loaded.parameters()).dtype == torch.bfloat16
    source_config = json.loads((model / "config.json").read_text())
    assert json.loads((written / "config.json").read_text()) == source_config
    assert loaded.config.eos_token_id == [2, 5] and loaded.config.pad_token_id == 0

    assert (written / "generation_config.json").read_bytes() == (model / "generation_config.json").read_bytes()
    assert GenerationConfig.from_pretrained(written).to_dict() == GenerationConfig.from_pretrained(model).to_dict()

    text = "Q: 23+45 日本語 🎉"
    assert AutoTokenizer.from_pretrained(written)(text)["input_ids"] == AutoTokenizer.from_pretrained(model)(text)["input_ids"]
