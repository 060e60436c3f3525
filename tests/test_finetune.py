"""Fine-tuning a TTT model with `transformers.Trainer`: padded and packed batches, gradient accumulation that equals
one big batch (`num_items_in_batch`), bf16 on the CPU, and PEFT LoRA with the TTT parameters trained beside the
adapter (save, reload, merge, generate)."""

import math

import pytest
import torch
from transformers import DataCollatorForLanguageModeling, DataCollatorWithFlattening, Trainer, TrainingArguments

from conftest import tiny_config
from modeling_ttt import TTTForCausalLM
from modeling_ttt.data import stdlib_source_dir, train_bpe_tokenizer

peft = pytest.importorskip("peft")
from peft import PeftModel  # noqa: E402

from modeling_ttt.peft import (  # noqa: E402
    TTTPeftModelForCausalLM,
    get_ttt_peft_model,
    load_ttt_peft_model,
    ttt_lora_config,
    ttt_lora_target_modules,
    ttt_parameters,
)

VOCAB_SIZE = 300
#: row lengths of the training data: different, so that padding and the token counts of any two micro-batches of
#: the first four rows differ
ROW_LENGTHS = (37, 12, 9, 20, 33, 16, 25, 40)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Nothing here may reach the Hub (PEFT looks up a base model's config there when it is not a local folder)."""
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def tokenizer():
    texts = [(stdlib_source_dir() / name).read_text(encoding="utf-8") for name in ("bisect.py", "colorsys.py")]
    return train_bpe_tokenizer(texts, vocab_size=VOCAB_SIZE, model_max_length=4096, show_progress=False)


@pytest.fixture(scope="module")
def rows(tokenizer):
    """Token rows of the lengths ROW_LENGTHS, cut from a stdlib file."""
    ids = tokenizer((stdlib_source_dir() / "textwrap.py").read_text(encoding="utf-8"))["input_ids"]
    out, start = [], 0
    for length in ROW_LENGTHS:
        out.append({"input_ids": ids[start:start + length]})
        start += length
    return out


def make_model(tokenizer, layer_type="linear", backbone="mamba", seed=0) -> TTTForCausalLM:
    torch.manual_seed(seed)
    config = tiny_config(layer_type, backbone, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return TTTForCausalLM(config)


def training_args(tmp_path, **overrides) -> TrainingArguments:
    kwargs = dict(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, save_strategy="no", logging_steps=1,
                  disable_tqdm=True, seed=0, per_device_train_batch_size=4, max_steps=3, learning_rate=1e-2,
                  lr_scheduler_type="constant", dataloader_pin_memory=False)
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def padded_collator(tokenizer):
    return DataCollatorForLanguageModeling(tokenizer, mlm=False)


def train_losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def parameters(model) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in model.named_parameters()}


# ----------------------------------------------------------------------------------------------------------------
# Trainer
# ----------------------------------------------------------------------------------------------------------------


def test_trainer_with_padded_batches(tokenizer, rows, tmp_path):
    model = make_model(tokenizer)
    before = parameters(model)
    trainer = Trainer(model=model, args=training_args(tmp_path, max_steps=4, learning_rate=2e-2), train_dataset=rows,
                      data_collator=padded_collator(tokenizer))
    trainer.train()
    losses = train_losses(trainer)
    assert len(losses) == 4 and all(math.isfinite(loss) for loss in losses)
    assert losses[0] == pytest.approx(math.log(VOCAB_SIZE), rel=0.1)  # a random model: about uniform
    assert min(losses[2:]) < losses[0] - 0.3  # it learns (two epochs over 8 rows)
    after = parameters(model)
    assert all(not torch.equal(before[name], after[name]) for name in before)  # every parameter trains


def _sgd_step(tokenizer, rows, tmp_path, name, collator=None, **overrides) -> dict[str, torch.Tensor]:
    """One plain SGD step (no clipping, no weight decay, no schedule), so the update is `-lr * gradient` exactly."""
    model = make_model(tokenizer)
    args = training_args(tmp_path / name, max_steps=1, optim="sgd", learning_rate=1.0, max_grad_norm=0.0,
                         weight_decay=0.0, **overrides)
    Trainer(model=model, args=args, train_dataset=rows, data_collator=collator or padded_collator(tokenizer)).train()
    return parameters(model)


def _expected_step(tokenizer, rows) -> dict[str, torch.Tensor]:
    """Initial weights minus the gradient of the mean token loss over all `rows` in one padded batch (by hand)."""
    model = make_model(tokenizer).train()
    initial = parameters(model)
    model(**padded_collator(tokenizer)(rows)).loss.backward()
    return {name: initial[name] - param.grad for name, param in model.named_parameters()}


def test_gradient_accumulation_equals_one_big_batch(tokenizer, rows, tmp_path):
    rows = rows[:4]  # one optimizer step reads all of them, in whatever order the sampler gives
    accumulated = _sgd_step(tokenizer, rows, tmp_path, "accumulated", per_device_train_batch_size=2,
                            gradient_accumulation_steps=2)
    one_batch = _sgd_step(tokenizer, rows, tmp_path, "one", per_device_train_batch_size=4,
                          gradient_accumulation_steps=1)
    expected = _expected_step(tokenizer, rows)

    model = make_model(tokenizer).train()
    initial = parameters(model)
    collator = padded_collator(tokenizer)

    # what the accumulation would give if every micro-batch's loss were its own mean (no num_items_in_batch): the
    # two micro-batches hold different numbers of tokens, so that is a different gradient, and the check can tell
    for micro in (rows[:2], rows[2:]):
        (model(**collator(micro)).loss / 2).backward()
    per_micro_mean = {name: initial[name] - param.grad for name, param in model.named_parameters()}

    gap = max((per_micro_mean[n] - expected[n]).abs().max().item() for n in expected)
    assert gap > 1e-4
    for name in expected:
        torch.testing.assert_close(one_batch[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(accumulated[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)


def test_packed_rows_give_the_loss_and_the_step_of_padded_rows(tokenizer, rows, tmp_path):
    rows = rows[:4]
    packed = DataCollatorWithFlattening()(rows)
    assert packed["input_ids"].shape == (1, sum(len(row["input_ids"]) for row in rows))
    model = make_model(tokenizer).eval()
    with torch.no_grad():
        packed_loss = model(**packed).loss
        padded_loss = model(**padded_collator(tokenizer)(rows)).loss
    # every document starts from the initial TTT state, and the first label of each is masked: the same targets
    torch.testing.assert_close(packed_loss, padded_loss, rtol=1e-5, atol=1e-6)

    # the accumulated step of packed micro-batches equals the step of one padded batch
    accumulated = _sgd_step(tokenizer, rows, tmp_path, "packed", collator=DataCollatorWithFlattening(),
                            per_device_train_batch_size=2, gradient_accumulation_steps=2)
    expected = _expected_step(tokenizer, rows)
    for name in expected:
        torch.testing.assert_close(accumulated[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)


def test_trainer_with_packed_rows(tokenizer, rows, tmp_path):
    model = make_model(tokenizer)
    trainer = Trainer(model=model, args=training_args(tmp_path, max_steps=4, learning_rate=2e-2), train_dataset=rows,
                      data_collator=DataCollatorWithFlattening())
    trainer.train()
    losses = train_losses(trainer)
    assert len(losses) == 4 and all(math.isfinite(loss) for loss in losses)
    assert min(losses[2:]) < losses[0] - 0.3


def test_forward_passes_num_items_in_batch_to_the_loss(tokenizer, rows):
    model = make_model(tokenizer).eval()
    batch = padded_collator(tokenizer)(rows[:2])
    with torch.no_grad():
        mean = model(**batch).loss
        summed = model(**batch, num_items_in_batch=torch.tensor(1)).loss
    targets = int((batch["labels"][:, 1:] != -100).sum())
    torch.testing.assert_close(summed, mean * targets, rtol=1e-5, atol=1e-5)


def test_bf16_on_the_cpu_is_finite_and_close_to_float32(tokenizer, rows, tmp_path):
    losses = {}
    for name, bf16 in (("fp32", False), ("bf16", True)):
        model = make_model(tokenizer)
        trainer = Trainer(model=model, args=training_args(tmp_path / name, bf16=bf16, max_steps=1), train_dataset=rows,
                          data_collator=padded_collator(tokenizer))
        trainer.train()
        losses[name] = train_losses(trainer)
        assert model.dtype == torch.float32  # mixed precision: float32 weights, bf16 autocast compute
    assert all(math.isfinite(loss) for loss in losses["bf16"])
    assert losses["bf16"] != losses["fp32"]  # autocast did run
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=2e-2)


# ----------------------------------------------------------------------------------------------------------------
# PEFT LoRA
# ----------------------------------------------------------------------------------------------------------------


def test_lora_target_modules_follow_the_config():
    assert ttt_lora_target_modules(tiny_config("linear", "mamba")) == ["q_proj", "v_proj", "o_proj", "g_proj"]
    assert ttt_lora_target_modules(tiny_config("mlp", "transformer")) == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert ttt_lora_target_modules(tiny_config("linear", "transformer", use_gate=True), include_mlp=True) == [
        "q_proj", "k_proj", "v_proj", "o_proj", "g_proj", "gate_proj", "up_proj", "down_proj"]
    config = ttt_lora_config(tiny_config(), r=4, alpha=8, dropout=0.1)
    assert (config.r, config.lora_alpha, config.lora_dropout, config.task_type) == (4, 8, 0.1, "CAUSAL_LM")
    assert set(config.target_modules) == {"q_proj", "v_proj", "o_proj", "g_proj"}


@pytest.mark.parametrize("train_ttt", [True, False], ids=["with-ttt-parameters", "adapter-only"])
def test_what_trains(tokenizer, train_ttt):
    model = make_model(tokenizer, "mlp", "transformer")
    peft_model = get_ttt_peft_model(model, ttt_lora_config(model, r=4), train_ttt_parameters=train_ttt)
    trainable = {name for name, param in peft_model.named_parameters() if param.requires_grad}
    lora = {name for name in trainable if ".lora_" in name}
    # LoRA A and B on q/k/v/o of both layers
    assert len(lora) == 2 * 4 * 2
    ttt = set(ttt_parameters(peft_model))
    assert len(ttt) == 2 * 9  # W1 b1 W2 b2, the lr gate, the token scale, the TTT norm: per layer
    assert trainable == (lora | ttt if train_ttt else lora)
    assert peft_model.saves_ttt_parameters is train_ttt


def _logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids=input_ids).logits


@pytest.mark.parametrize("variant", [("linear", "mamba"), ("mlp", "transformer")],
                         ids=["linear-mamba", "mlp-transformer"])
def test_lora_train_save_reload_merge_generate(tokenizer, rows, tmp_path, variant):
    base_folder = tmp_path / "base"
    make_model(tokenizer, *variant).save_pretrained(base_folder)
    base = TTTForCausalLM.from_pretrained(base_folder)
    ttt_before = {name: param.detach().clone() for name, param in ttt_parameters(base).items()}

    peft_model = get_ttt_peft_model(base, ttt_lora_config(base, r=4, alpha=8))
    trainer = Trainer(model=peft_model, args=training_args(tmp_path, max_steps=2, learning_rate=2e-2),
                      train_dataset=rows, data_collator=padded_collator(tokenizer))
    trainer.train()
    assert all(math.isfinite(loss) for loss in train_losses(trainer))
    adapter_folder = tmp_path / "adapter"
    trainer.save_model(str(adapter_folder))
    peft_model.eval()

    probe = torch.tensor([rows[0]["input_ids"][:19], rows[4]["input_ids"][:19]])
    trained = _logits(peft_model, probe)
    untouched = _logits(TTTForCausalLM.from_pretrained(base_folder).eval(), probe)
    assert (trained - untouched).abs().max() > 1e-3
    # the TTT parameters trained in full
    assert all(not torch.equal(ttt_before[name.removeprefix("base_model.model.")], param)
               for name, param in ttt_parameters(peft_model).items())

    # the adapter folder holds the LoRA weights and the TTT parameters; stock PEFT restores both
    from safetensors import safe_open

    with safe_open(str(adapter_folder / "adapter_model.safetensors"), framework="pt") as file:
        keys = set(file.keys())
    assert set(ttt_parameters(peft_model)) <= keys and any(".lora_A." in key for key in keys)
    reloaded = PeftModel.from_pretrained(TTTForCausalLM.from_pretrained(base_folder), str(adapter_folder)).eval()
    torch.testing.assert_close(_logits(reloaded, probe), trained, rtol=0, atol=0)
    ours = load_ttt_peft_model(TTTForCausalLM.from_pretrained(base_folder), str(adapter_folder), is_trainable=True)
    assert isinstance(ours, TTTPeftModelForCausalLM) and ours.saves_ttt_parameters
    assert all(param.requires_grad for param in ttt_parameters(ours).values())
    torch.testing.assert_close(_logits(ours.eval(), probe), trained, rtol=0, atol=0)

    # generate through PEFT's wrapper (the TTT cache goes through it), then on the merged plain model
    prompt = probe[:, :7]
    generated = reloaded.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6,
                                  do_sample=False)
    assert generated.shape == (2, 13) and torch.equal(generated[:, :7], prompt)
    full = _logits(reloaded, generated[:, :-1])
    torch.testing.assert_close(generated[:, 7:], full[:, 6:].argmax(-1))  # greedy: each token is the argmax

    merged = reloaded.merge_and_unload()
    assert type(merged) is TTTForCausalLM
    assert not any("lora" in name for name, _ in merged.named_parameters())
    torch.testing.assert_close(_logits(merged, probe), trained, rtol=1e-5, atol=1e-5)
    merged_generated = merged.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6,
                                       do_sample=False)
    assert torch.equal(merged_generated, generated)

    merged.save_pretrained(tmp_path / "merged")
    round_trip = TTTForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(_logits(round_trip, probe), _logits(merged, probe), rtol=0, atol=0)


def test_adapter_only_training_leaves_the_ttt_parameters_and_saves_none(tokenizer, rows, tmp_path):
    model = make_model(tokenizer)
    before = {name: param.detach().clone() for name, param in ttt_parameters(model).items()}
    peft_model = get_ttt_peft_model(model, ttt_lora_config(model, r=4), train_ttt_parameters=False)
    trainer = Trainer(model=peft_model, args=training_args(tmp_path, max_steps=1), train_dataset=rows,
                      data_collator=padded_collator(tokenizer))
    trainer.train()
    for name, param in ttt_parameters(model).items():
        assert torch.equal(param, before[name]), name
    trainer.save_model(str(tmp_path / "adapter"))
    from safetensors import safe_open

    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), framework="pt") as file:
        assert all(".lora_" in key for key in file.keys())


def test_pickle_adapter_files_and_named_adapters_hold_the_ttt_parameters(tokenizer, tmp_path):
    base_folder = tmp_path / "base"
    make_model(tokenizer).save_pretrained(base_folder)
    peft_model = get_ttt_peft_model(TTTForCausalLM.from_pretrained(base_folder),
                                    ttt_lora_config(tiny_config(), r=4, init_lora_weights=False),
                                    adapter_name="mine")
    with torch.no_grad():  # stand-ins for training: new TTT parameters
        for param in ttt_parameters(peft_model).values():
            param.add_(0.05 * torch.randn_like(param))
    probe = torch.arange(3, 23).view(1, -1)
    expected = _logits(peft_model.eval(), probe)
    peft_model.save_pretrained(str(tmp_path / "adapters"), safe_serialization=False)
    folder = tmp_path / "adapters" / "mine"  # PEFT's place for an adapter not named "default"
    assert (folder / "adapter_model.bin").exists() and not (folder / "adapter_model.safetensors").exists()
    reloaded = PeftModel.from_pretrained(TTTForCausalLM.from_pretrained(base_folder), str(folder)).eval()
    torch.testing.assert_close(_logits(reloaded, probe), expected, rtol=0, atol=0)
    ours = load_ttt_peft_model(TTTForCausalLM.from_pretrained(base_folder), str(folder))
    assert ours.saves_ttt_parameters
    torch.testing.assert_close(_logits(ours.eval(), probe), expected, rtol=0, atol=0)
