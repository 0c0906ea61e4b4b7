"""Convert between Hugging Face model directories and Loom checkpoints.

    python tools/convert_hf.py import --hf HF_DIR --out LOOM_DIR
    python tools/convert_hf.py export --ckpt LOOM_DIR --out HF_DIR [--dtype bf16] [--arch Qwen2ForCausalLM]
    python tools/convert_hf.py import --hf HF_DIR --adapter PEFT_DIR --out LOOM_DIR   # base + a LoRA adapter
    python tools/convert_hf.py import --hf LLM_DIR --vision-from CLIP_OR_SIGLIP_DIR --out LOOM_DIR  # a new VLM
    python tools/convert_hf.py export --ckpt LOOM_DIR --out PEFT_DIR --adapter-only   # or --merge-lora

Both directions stream: one tensor (export: one output shard) is in memory at a time, so a
checkpoint converts on a machine with less memory than the model. Import writes a weights-only
checkpoint that ``checkpoint.resume=LOOM_DIR`` or ``loom.from_pretrained(LOOM_DIR)`` loads; export
writes safetensors shards, config.json and the tokenizer files carried since the import.
Families: Llama, Qwen2, Qwen3, Mixtral, Qwen2-MoE, Qwen3-MoE, LLaVA 1.5, Qwen2.5-VL, Qwen3-VL.

``--vision-from`` builds a VLM: the LLM of ``--hf`` (a text model, or a LLaVA whose tower and projector
are replaced), the vision tower of a CLIPVisionModel / SiglipVisionModel directory (or of a whole
CLIPModel / SiglipModel), with ``model.vision`` (arch, sizes, image and patch size) from its config,
and a new projector from the tower's width to the LLM's, initialised for training.
"""
from __future__ import annotations

import argparse
import sys

from loom import cli



def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="HF directory -> Loom checkpoint")
    imp.add_argument("--hf", required=True, help="HF model directory (config.json + *.safetensors)")
    imp.add_argument("--out", required=True, help="Loom checkpoint directory to write")
    imp.add_argument("--adapter", default=None, help="a PEFT LoRA adapter directory on that model: the checkpoint "
                                                     "carries it, and its finetune.lora settings, to continue training")
    imp.add_argument("--vision-from", default=None, help="a CLIP / SigLIP vision model directory: its tower, "
                                                         "with a new projector, joins the LLM of --hf in a VLM")
    exp = sub.add_parser("export", help="Loom checkpoint -> HF directory")
    exp.add_argument("--ckpt", required=True, help="Loom checkpoint directory (with checkpoint.json)")
    exp.add_argument("--out", required=True, help="HF directory to write")
    exp.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                     help="output dtype (default: as stored; imported weights round-trip bit for bit)")
    exp.add_argument("--arch", default=None, help="HF architecture to write (default: the imported one, "
                                                  "else inferred from the model config)")
    exp.add_argument("--max-shard-gb", type=float, default=5.0, help="largest safetensors shard")
    lora = exp.add_mutually_exclusive_group()
    lora.add_argument("--adapter-only", action="store_true",
                      help="write the LoRA adapters as a PEFT adapter directory (adapter_config.json, "
                           "adapter_model.safetensors)")
    lora.add_argument("--merge-lora", action="store_true", help="write HF weights with the adapters merged in")
    return parser.parse_args(argv)


@cli.entry
def main(argv=None) -> int:
    args = parse_args(argv)
    from loom.model.hf.convert import export_hf, import_hf

    if args.command == "import":  # a bad directory raises ConversionError / CheckpointError: loom.cli reports it
        out = import_hf(args.hf, args.out, adapter=args.adapter, vision_from=args.vision_from)
    else:
        out = export_hf(args.ckpt, args.out, dtype=args.dtype, arch=args.arch,
                        max_shard_bytes=int(args.max_shard_gb * 2**30), merge_lora=args.merge_lora,
                        adapter_only=args.adapter_only)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
