"""The command line's flags for weights from files of their own: a component's file (--transformer, --vae, ...)
and LoRAs (--lora, --lora_2), turned into minialg.load's and minialg.check's keywords."""

import argparse

from .config import lora_entry


FILES = ("transformer", "transformer_2", "vae", "text_encoder", "image_encoder")  # minialg.load's file keywords


def add_transformer_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--transformer", default=None, metavar="FILE",
                        help="Wan: the transformer from a file or folder of its own (official, ComfyUI or diffusers "
                             "names; fp32, bf16, fp16, fp8, scaled fp8) instead of the model folder's")
    parser.add_argument("--transformer_2", default=None, metavar="FILE",
                        help="Wan 2.2 I2V-A14B: the low-noise expert from a file or folder of its own")
    for flag, whose in (("lora", "the transformer"), ("lora_2", "Wan 2.2 A14B's low-noise expert")):
        parser.add_argument(f"--{flag}", nargs="+", action="extend", metavar="FILE[:STRENGTH]", help=f"Wan: LoRAs "
                            f"merged into {whose} (diffusers/PEFT, ComfyUI, kohya/musubi, .diff deltas; a hub file "
                            f"as org/repo/file), strength 1 by default; repeatable; overrides model.{flag}")
    parser.add_argument("--lora_skip_unmatched", action="store_true",
                        help="merge a LoRA with keys that match nothing (a warning names them) instead of refusing it")
    for name in FILES[2:]:
        parser.add_argument(f"--{name}", default=None, metavar="FILE", help=f"Wan: the {name} from a file of its "
                            "own (official .pth, ComfyUI's or diffusers/transformers names, as stored)")


def component_files(args) -> dict:
    return {name: getattr(args, name) for name in FILES}  # the components given as files of their own


def loras(args, config=None) -> dict:
    """load's and check's LoRA keywords: --lora / --lora_2 (FILE[:STRENGTH]) where given, else the config's."""
    return {key: getattr(config, key, []) if given is None else [lora_entry(e) for e in given]
            for key, given in (("loras", args.lora), ("loras_2", args.lora_2))}
