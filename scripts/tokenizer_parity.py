#!/usr/bin/env python3
"""Parity of `host`'s tokenizer and chat templates with transformers and TRL.

Two modes:

  python3 scripts/tokenizer_parity.py regenerate
      Trains a small byte-level BPE tokenizer with the `tokenizers` library on text
      like the built-in data's (host/src/data/builtin.rs: addition facts, the
      `Q: ..\\nA: ..` assistant format, the `Sure, ..!` style) plus the fixture
      conversations, writes one model-folder tokenizer per chat template family
      under tests/fixtures/tokenizers/<family>/ (tokenizer.json,
      tokenizer_config.json), and records in tests/fixtures/tokenizers/expected.json
      what transformers' AutoTokenizer and apply_chat_template, and TRL's DPO and
      SFT tokenization, give for a set of conversations. `cargo test -p host --test
      tokenizer_parity` reproduces every entry, so CI needs no transformers.
      Needs transformers 5.24, trl 1.16, tokenizers 0.23.3:
          python3 -m venv /tmp/venv-t && /tmp/venv-t/bin/pip install \\
              transformers==5.24.0 trl==1.16.0 tokenizers==0.23.3
          /tmp/venv-t/bin/python scripts/tokenizer_parity.py regenerate

  python3 scripts/tokenizer_parity.py compare
      Recomputes everything from the committed tokenizer folders and reports each
      entry of expected.json that differs (exit 1 if any does).

The chat templates are the published strings, copied exactly:
  llama3  meta-llama/Meta-Llama-3-8B-Instruct, tokenizer_config.json `chat_template`
          (the revision with `add_generation_prompt`)
  qwen2   Qwen/Qwen2-7B-Instruct, tokenizer_config.json `chat_template`
  mistral mistralai/Mistral-7B-Instruct-v0.2, tokenizer_config.json `chat_template` (the same
          string as Mixtral-8x7B-Instruct-v0.1's; Mistral-7B-Instruct-v0.1's adds ' ' after eos_token)
They are also quoted verbatim in many public code bases, which is where these
copies were checked. Each family's special tokens and BOS/EOS settings follow its
published tokenizer_config.json; tokenizer_class is PreTrainedTokenizerFast for all
three, so transformers takes tokenizer.json as it is (as it does for Llama-3).
"""

import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "tokenizers"

LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
QWEN2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

SPECIAL_TOKENS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>", "</s>", "<unk>",
]

# family: (template, tokenizer_config.json special-token entries, post-processor in tokenizer.json)
FAMILIES = {
    # Llama-3: BOS added by tokenizer.json's TemplateProcessing, no add_bos_token key.
    "llama3": (LLAMA3_TEMPLATE, {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}, "bos"),
    # Qwen2: no BOS at all, no post-processor.
    "qwen2": (QWEN2_TEMPLATE, {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, None),
    # Mistral v0.2: add_bos_token as published, which transformers 5 drops when tokenizer.json exists
    # (so tokenizer(text) adds no BOS here); AddedToken objects for the tokens.
    "mistral": (
        MISTRAL_TEMPLATE,
        {
            "add_bos_token": True,
            "add_eos_token": False,
            "bos_token": {"__type": "AddedToken", "content": "<s>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False},
            "eos_token": {"__type": "AddedToken", "content": "</s>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False},
            "unk_token": "<unk>",
        },
        None,
    ),
}

CONVERSATIONS = {
    "unicode": [
        {"role": "user", "content": "Ünïcödé: 日本語のテキスト, emoji 🎉 and a tab\tend?"},
        {"role": "assistant", "content": "  Ça va — très bien 👍  "},
    ],
    "empty_system": [
        {"role": "system", "content": ""},
        {"role": "user", "content": "Q: 23+45"},
        {"role": "assistant", "content": "Sure, 68!"},
    ],
    "multi_turn": [
        {"role": "user", "content": "Q: 2+3"},
        {"role": "assistant", "content": "5"},
        {"role": "user", "content": "And 40+2?"},
        {"role": "assistant", "content": "Sure, 42!"},
    ],
    "system_prompt": [
        {"role": "system", "content": "Answer briefly.\n"},
        {"role": "user", "content": "What is 7+8?"},
        {"role": "assistant", "content": "15"},
    ],
}

TEXTS = ["23+45=68\n", "Q: 23+45\nA: Sure, 68!\n", " leading space, <s> and <|im_end|> inside", "日本語 🎉", ""]

# TRL preference and SFT records (each tokenized as DPOTrainer / SFTTrainer do).
PREFERENCES = {
    "strings": {"prompt": "Q: 23+45\nA:", "chosen": " Sure, 68!", "rejected": " 68"},
    "conversational": {
        "prompt": [{"role": "user", "content": "Q: 2+3"}],
        "chosen": [{"role": "assistant", "content": "Sure, 5!"}],
        "rejected": [{"role": "assistant", "content": "6"}],
    },
    "implicit_prompt": {
        "chosen": CONVERSATIONS["multi_turn"],
        "rejected": CONVERSATIONS["multi_turn"][:3] + [{"role": "assistant", "content": "43"}],
    },
}
SFT = {
    "text": {"text": "1+1=2\n"},
    "prompt_completion": {"prompt": "Q: 1+1\nA:", "completion": " 2"},
    "conversational_prompt_completion": {
        "prompt": [{"role": "user", "content": "Q: 1+1"}],
        "completion": [{"role": "assistant", "content": "Sure, 2!"}],
    },
    "messages": {"messages": CONVERSATIONS["multi_turn"]},
}


def corpus():
    """Text in the built-in data's formats, seeded, plus the fixture strings."""
    rng = random.Random(7)
    lines = []
    for _ in range(3000):
        a, b = rng.randrange(100), rng.randrange(10)
        lines.append(rng.choice([f"{a}+{b}={a + b}\n", f"Q: {a}+{b}\nA: {a + b}\n", f"Q: {a}+{b}\nA: Sure, {a + b}!\n"]))
    for conv in CONVERSATIONS.values():
        lines.extend(m["content"] for m in conv)
    lines.extend(TEXTS)
    lines.append("You are a helpful assistant. Answer briefly. What is And system user assistant")
    return lines


def train_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer)
    return tok


def write_family(name, base_json):
    from tokenizers import Tokenizer, processors

    template, specials, post = FAMILIES[name]
    tok = Tokenizer.from_str(base_json)
    if post == "bos":
        bos = "<|begin_of_text|>"
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    folder = FIXTURES / name
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 8192, "chat_template": template, **specials}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def expected_for(folder):
    from transformers import AutoTokenizer
    from trl.data_utils import _tokenize, common_prefix_length, extract_prompt, is_conversational

    tok = AutoTokenizer.from_pretrained(str(folder))
    out = {"encode": [], "chat": [], "preference": {}, "sft": {}}
    for text in TEXTS:
        out["encode"].append({"text": text, "ids": tok(text)["input_ids"]})
    for name, conv in CONVERSATIONS.items():
        for messages, gen in ((conv, False), (conv[:-1], True)):
            entry = {"conversation": name, "messages": len(messages), "add_generation_prompt": gen}
            try:
                entry["text"] = tok.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)
                entry["ids"] = tok.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True, return_dict=True)["input_ids"]
            except Exception as e:  # the template's raise_exception
                entry["error"] = str(e)
            out["chat"].append(entry)

    def with_eos(s):
        return s if s.endswith(tok.eos_token) else s + tok.eos_token

    # DPOTrainer._prepare_dataset, step by step with TRL's own functions.
    for name, record in PREFERENCES.items():
        ex = dict(record) if "prompt" in record else extract_prompt(dict(record))
        try:
            if is_conversational(ex):
                p = _tokenize(tok, ex["prompt"], add_generation_prompt=True)["input_ids"]
                pc = _tokenize(tok, ex["prompt"] + ex["chosen"])["input_ids"]
                pr = _tokenize(tok, ex["prompt"] + ex["rejected"])["input_ids"]
            else:
                p = _tokenize(tok, ex["prompt"])["input_ids"]
                pc = _tokenize(tok, ex["prompt"] + with_eos(ex["chosen"]))["input_ids"]
                pr = _tokenize(tok, ex["prompt"] + with_eos(ex["rejected"]))["input_ids"]
            n = min(common_prefix_length(p, pc), common_prefix_length(p, pr))
            out["preference"][name] = {"prompt_ids": p[:n], "chosen_ids": pc[n:], "rejected_ids": pr[n:]}
        except Exception as e:
            out["preference"][name] = {"error": str(e)}

    # SFTTrainer._prepare_dataset's tokenize_fn (completion_mask as the scored tokens).
    for name, ex in SFT.items():
        try:
            if "prompt" in ex:
                if is_conversational(ex):
                    p = _tokenize(tok, ex["prompt"], add_generation_prompt=True)["input_ids"]
                    pc = _tokenize(tok, ex["prompt"] + ex["completion"])["input_ids"]
                else:
                    p = _tokenize(tok, ex["prompt"])["input_ids"]
                    pc = _tokenize(tok, ex["prompt"] + with_eos(ex["completion"]))["input_ids"]
                n = common_prefix_length(p, pc)
                out["sft"][name] = {"input_ids": pc, "completion_mask": [0] * n + [1] * (len(pc) - n)}
            elif "messages" in ex:
                ids = _tokenize(tok, ex["messages"])["input_ids"]
                out["sft"][name] = {"input_ids": ids, "completion_mask": [1] * len(ids)}
            else:
                ids = _tokenize(tok, with_eos(ex["text"]))["input_ids"]
                out["sft"][name] = {"input_ids": ids, "completion_mask": [1] * len(ids)}
        except Exception as e:
            out["sft"][name] = {"error": str(e)}
    return out


def compute():
    return {
        "conversations": CONVERSATIONS,
        "preferences": PREFERENCES,
        "sft": SFT,
        "families": {name: expected_for(FIXTURES / name) for name in FAMILIES},
    }


def main():
    mode = sys.argv[1] if len(sys.argv) > 1 else ""
    expected_path = FIXTURES / "expected.json"
    if mode == "regenerate":
        base = train_tokenizer().to_str()
        for name in FAMILIES:
            write_family(name, base)
        expected_path.write_text(json.dumps(compute(), indent=1, ensure_ascii=False) + "\n")
        print(f"wrote {FIXTURES}")
    elif mode == "compare":
        committed = json.loads(expected_path.read_text())
        now = compute()
        bad = [f"{name}: {key}" for name, fam in now["families"].items() for key in fam if fam[key] != committed["families"][name][key]]
        for b in bad:
            print("differs:", b)
        print(f"{len(bad)} differing sections")
        sys.exit(1 if bad else 0)
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
