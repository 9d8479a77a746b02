"""The medical chain-of-thought SFT recipe, as an Unsloth + TRL user writes it, with fastft-jax imports.

    python examples/medical_cot.py --model ckpts/qwen2.5-7b --data data/train.jsonl

The YAML equivalent is examples/medical_cot.yaml.
"""

import argparse

from datasets import load_dataset

from fastft_jax import FastLanguageModel, SFTTrainer, TrainingArguments, is_bfloat16_supported

PROMPT = """Below is an instruction that describes a task, paired with an input that provides further context.
Write a response that appropriately completes the request.
Before answering, think carefully about the question and create a step-by-step chain of thoughts to ensure a logical and accurate response.

### Instruction:
You are a medical expert with advanced knowledge in clinical reasoning, diagnostics, and treatment planning.
Please answer the following medical question.

### Question:
{}

### Response:
<think>
{}
</think>
{}"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ckpts/qwen2.5-7b")
    parser.add_argument("--data", default="data/train.jsonl")
    parser.add_argument("--max-seq-length", type=int, default=8192)
    parser.add_argument("--max-steps", type=int, default=-1)
    parser.add_argument("--output-dir", default="outputs")
    args = parser.parse_args()

    model, tokenizer = FastLanguageModel.from_pretrained(args.model, max_seq_length=args.max_seq_length, dtype=None)
    eos_token = tokenizer.eos_token

    def formatting_data(examples):
        texts = []
        for question, cot, response in zip(examples["Question"], examples["Complex_CoT"], examples["Response"]):
            texts.append(PROMPT.format(question, cot, response) + eos_token)
        return {"text": texts}

    dataset = load_dataset("json", data_files=args.data, split="train").map(formatting_data, batched=True)
    model = FastLanguageModel.get_peft_model(
        model, r=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        lora_alpha=16, lora_dropout=0, bias="none", use_gradient_checkpointing="unsloth",
        random_state=3407, use_rslora=False, loftq_config=None)
    trainer = SFTTrainer(
        model=model, tokenizer=tokenizer, train_dataset=dataset, dataset_text_field="text",
        max_seq_length=args.max_seq_length, dataset_num_proc=2, packing=False,
        args=TrainingArguments(per_device_train_batch_size=2, gradient_accumulation_steps=4, warmup_steps=10,
                               num_train_epochs=3, max_steps=args.max_steps, learning_rate=2e-4,
                               fp16=not is_bfloat16_supported(), bf16=is_bfloat16_supported(), logging_steps=2,
                               optim="adamw_8bit", weight_decay=0.01, lr_scheduler_type="linear",
                               output_dir=args.output_dir, seed=3407, report_to="none"))
    train_stats = trainer.train()
    print(train_stats)
    model.save_pretrained(f"{args.output_dir}/lora_model")
    tokenizer.save_pretrained(f"{args.output_dir}/lora_model")


if __name__ == "__main__":
    main()
