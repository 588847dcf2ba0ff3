"""The TRL drop-in: DPOTrainer(..., optimizers=(OnDAREAdamW(...), None)) trains a
tiny random Llama on the CPU, loss decreasing, with TRL's metrics logged."""

import copy

import pytest

import torch
import trl
from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

from merge_core import OnDAREAdamW, OnTIESAdamW  # noqa: E402

PAIRS = [
    ("the cat", "sat on the mat", "flew to the moon"),
    ("a dog", "ran in the park", "sang in the sea"),
    ("the bird", "flew over the tree", "swam under the rock"),
    ("a fish", "swam in the sea", "ran on the road"),
]


def tokenizer():
    words = sorted({w for triple in PAIRS for text in triple for w in text.split()})
    vocab = {tok: i for i, tok in enumerate(["<pad>", "<s>", "</s>", "<unk>"] + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


def llama(vocab, seed):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(cfg)


@pytest.mark.parametrize("cls", [OnDAREAdamW, OnTIESAdamW])
def test_dpo_trainer_trains_with_the_online_merging_optimizer(cls, tmp_path):
    tok = tokenizer()
    base = llama(len(tok), 0)
    sft = copy.deepcopy(base)
    with torch.no_grad():
        for p in sft.parameters():
            p.add_(torch.randn_like(p) * 1e-3)
    policy, ref = copy.deepcopy(sft), copy.deepcopy(sft)
    opt = cls(policy.named_parameters(), lr=5e-3, reserve_p=0.5, use_merge=True, alpha=0.01, seed=0)
    opt.init_ref_param_diff(sft, base)
    data = Dataset.from_list([{"prompt": p, "chosen": " " + c, "rejected": " " + r} for p, c, r in PAIRS])
    args = trl.DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=12, logging_steps=1,
                         report_to=[], use_cpu=True, learning_rate=5e-3, lr_scheduler_type="constant",
                         save_strategy="no", beta=0.1, max_length=32, seed=0, disable_tqdm=True)
    trainer = trl.DPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=data, processing_class=tok,
                             optimizers=(opt, None))
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 12
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert key in logs[0], f"TRL metric {key} missing: {sorted(logs[0])}"
    assert logs[-1]["loss"] < logs[0]["loss"] - 0.05, [h["loss"] for h in logs]
    assert all(opt.state[p]["step"] == 12 for p in policy.parameters())
