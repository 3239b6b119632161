"""``owl-lightning``: the two training stages (LightningCLI) and the tools around them.

owl-lightning stage1 fit --config experiments/stage1_smol.yaml [--ckpt_path last]
owl-lightning stage2 fit --config experiments/stage2_smol.yaml [--ckpt_path last]
owl-lightning describe owl-llama7b [--json]
owl-lightning data [--out data/embedded]
owl-lightning data scenes [--out data/scenes] [--train-scenes N] [--seed S]
owl-lightning data video [--out data/video] [--train-per-combination N] [--seed S]
owl-lightning data interleaved [--out data/interleaved] [--embedded data/embedded]
owl-lightning data general-text [--out data/general_text]
owl-lightning eval --ckpt RUN_OR_CKPT [--vqa-limit N]
owl-lightning eval --ckpt RUN_OR_CKPT --tasks vqav2,pope[,...] [--root pope=DIR] [--choice likelihood] [--limit N]
owl-lightning chat --ckpt RUN_OR_CKPT --image a.jpg [--image b.jpg] [--video clip.mp4] [--prompt "..."]
owl-lightning owleval --ckpt RUN_OR_CKPT --out answers.jsonl [--data ../shared/owleval]
owl-lightning rate --answers DIR_OR_FILE [--answers ...] [--ratings owleval_ratings.jsonl] [--summary] [--no-blind]
owl-lightning serve --ckpt RUN_OR_CKPT [--port 7860] [--api-key KEY] [--allow-image-urls] [--max-batch 8]
owl-lightning export --ckpt RUN_OR_CKPT --out DIR
owl-lightning convert-official --src OFFICIAL_DIR [--src ADAPTER_DIR] --out DIR [--config owl-llama7b] [--overrides JSON]
owl-lightning consolidate SHARDED_CKPT_OR_RUN OUT.ckpt
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
import warnings
from dataclasses import asdict
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from owl_lightning.inference import LoadOptions

from owl_lightning.config import PRECISIONS, auto_trainer_precision, get_config, list_configs

USAGE = __doc__


def _add_loading_arguments(parser: argparse.ArgumentParser, inference: bool = True) -> None:
    """``--ckpt`` and how to load it: what the checkpoint itself is never trusted to choose, and (for
    commands that run the model) the device and precision."""
    from owl_lightning.checkpoints import LLM_SOURCE_FLAG, TRUST_REMOTE_CODE_FLAG

    parser.add_argument("--ckpt", required=True, help="a .ckpt file, a run folder (uses checkpoints/last.ckpt) or an exported folder")
    if inference:
        parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when there is a GPU)")
        parser.add_argument(
            "--precision",
            default="auto",
            choices=PRECISIONS,
            help="autocast precision; auto: bf16 where the device computes it natively (GPUs, CPUs with AVX-512 BF16 "
            "or AMX), else fp32 (default: %(default)s)",
        )
    parser.add_argument(
        LLM_SOURCE_FLAG,
        default=None,
        help="the LLM (folder or hub id) to load a checkpoint's frozen base weights from when its stored source is "
        "not packaged, random or the export's own llm/ folder: a checkpoint cannot choose where weights come from",
    )
    parser.add_argument(
        TRUST_REMOTE_CODE_FLAG,
        action="store_true",
        help="let transformers run the Python files that come with that LLM (only for code you trust)",
    )


def _load_options(ns: argparse.Namespace) -> LoadOptions:
    from owl_lightning.inference import LoadOptions

    return LoadOptions(getattr(ns, "device", None), getattr(ns, "precision", "auto"), ns.llm_source, ns.trust_remote_code)


def _stage_cli(stage: str, args: list[str]) -> None:
    from lightning.pytorch.cli import LightningCLI

    from owl_lightning.config import STAGE1, STAGE2
    from owl_lightning.train.datamodules import CaptionDataModule, InstructionDataModule
    from owl_lightning.train.system import STAGE1_OPTIMIZER, STAGE2_OPTIMIZER, OwlSystem

    recipe, optimizer, data_class = {
        "stage1": (STAGE1, STAGE1_OPTIMIZER, CaptionDataModule),
        "stage2": (STAGE2, STAGE2_OPTIMIZER, InstructionDataModule),
    }[stage]

    class OwlCLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:
            # A stage is the system's recipe and optimizer defaults (the YAML may change either).
            parser.set_defaults({"model.recipe": asdict(recipe), "model.optimizer": asdict(optimizer)})
            # bf16 autocast where the device computes bf16 natively; on other CPUs it is many times slower than fp32.
            parser.set_defaults({"trainer.precision": auto_trainer_precision()})
            # The data is tokenised and preprocessed by the model's own processor: one source of truth.
            parser.link_arguments("model", "data.processor", compute_fn=lambda system: system.processor, apply_on="instantiate")
            # One setting moves a run: TensorBoard files and (ModelCheckpoint dirpath null) checkpoints follow it.
            parser.link_arguments("trainer.default_root_dir", "trainer.logger.init_args.save_dir")

        def parse_arguments(self, parser, args) -> None:
            # From sys.argv, so that LightningCLI does not warn of arguments given two ways; sys.argv itself
            # stays whole for the processes Lightning launches by re-running this command.
            argv, sys.argv = sys.argv, [prog, *args]
            try:
                super().parse_arguments(parser, None)
            finally:
                sys.argv = argv

        def before_fit(self) -> None:
            logger = self.trainer.logger
            if logger is not None and getattr(logger, "save_dir", None):
                print(f"TensorBoard: tensorboard --logdir {logger.save_dir}", flush=True)

    # All by design: frozen modules stay in eval mode; our iterable datasets split their batches over
    # workers themselves, so their __len__ is exact; and the system's own batch transfer (it makes each
    # batch's token layout on the host first) is the one meant to run beside the data module.
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined")
    warnings.filterwarnings("ignore", message=r"You have overridden `transfer_batch_to_device` in `LightningModule` but")
    prog = f"owl-lightning {stage}"
    OwlCLI(
        OwlSystem,
        data_class,
        args=args,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": prog},
        auto_configure_optimizers=False,
    )


def describe(name: str) -> dict:
    """Parameter counts of a named config, built on the ``meta`` device (no download, no memory), and
    what each recipe trains."""
    from owl_lightning.config import STAGE1, STAGE2, TrainRecipe
    from owl_lightning.models.owl import build_owl, max_visual_tokens_per_image, visual_tokens_per_clip

    config = get_config(name)
    recipes = {"stage1": STAGE1, "stage2": STAGE2, "stage2_full": TrainRecipe(vision="frozen", abstractor="train", llm="full")}
    trainable = {}
    for recipe_name, recipe in recipes.items():
        with torch.device("meta"):
            model = build_owl(config, pretrained=False)
        model.apply_recipe(recipe)
        trainable[recipe_name] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    params = {part: sum(p.numel() for p in getattr(model, part).parameters()) for part in ("vision", "abstractor")}
    params["llm"] = sum(p.numel() for n, p in model.llm.named_parameters() if "lora_" not in n)
    return {
        "name": name,
        "total_params": sum(params.values()),
        "params": params,
        "trainable_params": trainable,
        "visual_tokens_per_image": model.visual_tokens_per_image,
        "max_visual_tokens_per_image": max_visual_tokens_per_image(config),
        "image_mode": config.image.mode,
        "visual_tokens_per_clip": visual_tokens_per_clip(config),
        "video_frames": config.video.num_frames,
    }


def model_yaml(name: str) -> str:
    """A registered model config as the YAML file ``--model.config`` takes."""
    import yaml

    header = f"# The {name} model config, as owl_lightning registers it (owl-lightning describe {name} --yaml).\n"
    return header + yaml.safe_dump(get_config(name).to_dict(), sort_keys=False)


def _describe_main(args: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="owl-lightning describe", description="Parameter counts of a model config.")
    parser.add_argument("name", help=f"one of: {', '.join(list_configs())}")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument(
        "--yaml", action="store_true", help="print the config as YAML, to stack under --model.config (experiments/models/ holds these)"
    )
    ns = parser.parse_args(args)
    try:
        info = describe(ns.name)
    except KeyError as err:
        parser.error(str(err.args[0]))
    if ns.yaml:
        print(model_yaml(ns.name), end="")
        return
    if ns.json:
        print(json.dumps(info, indent=2))
        return
    tokens = info["visual_tokens_per_image"]
    if info["max_visual_tokens_per_image"] != tokens:  # AnyRes: a view's tokens up to the largest tile grid's
        tokens = f"{tokens}–{info['max_visual_tokens_per_image']} ({info['image_mode']})"
    print(
        f"{info['name']}: {info['total_params'] / 1e9:.3f}B parameters, {tokens} visual tokens per image, "
        f"{info['visual_tokens_per_clip']} per video clip ({info['video_frames']} frames)"
    )
    for part, n in info["params"].items():
        print(f"  {part:<11} {n:>15,}")
    for stage, n in info["trainable_params"].items():
        print(f"  trainable in {stage}: {n:,}")


# ``owl-lightning data NAME``: the builders besides the embedded default (no name), by module under apps/.
DATA_BUILDERS = {"scenes": "scenes", "video": "video", "interleaved": "interleaved", "general-text": "general_text"}


def _data_main(args: list[str]) -> None:
    if args and args[0] in DATA_BUILDERS:
        module, args = DATA_BUILDERS[args[0]], args[1:]
    else:
        module = "embedded"
    importlib.import_module(f"owl_lightning.apps.{module}").main(args)


def _eval_main(args: list[str]) -> None:
    from owl_lightning.apps.eval.benchmarks import TASKS, BenchmarkFileError
    from owl_lightning.apps.eval.benchmarks.harness import CHOICE_MODES
    from owl_lightning.apps.eval.processes import Processes
    from owl_lightning.apps.eval.run import UnknownTask, evaluate, evaluate_tasks, summary_table, tasks_table

    parser = argparse.ArgumentParser(
        prog="owl-lightning eval",
        description="Evaluate a checkpoint. Without --tasks: easy-VQA accuracy, caption BLEU, text-only ability against the "
        "base LLM (perplexity on the training's own text task and on unseen English prose; answers to held-out text prompts), "
        "qualitative sheet. With --tasks: those benchmarks, from local copies in their official formats (docs/evaluation.md). "
        "Writes <run>/eval.json.",
    )
    _add_loading_arguments(parser)
    parser.add_argument("--tasks", default=None, help=f"comma-separated benchmarks: {', '.join(TASKS)}")
    parser.add_argument(
        "--root",
        action="append",
        default=[],
        metavar="TASK=DIR",
        help="a task's folder (repeat for several; default: benchmarks/TASK, and data/embedded for easy_vqa)",
    )
    parser.add_argument(
        "--choice", default="generate", choices=CHOICE_MODES, help="how multiple-choice questions are answered (default: %(default)s)"
    )
    parser.add_argument("--limit", type=int, default=None, help="with --tasks: the first N questions of each task (default: all)")
    parser.add_argument("--data", default="data/embedded", help="the embedded data folder (make data)")
    parser.add_argument("--vqa-limit", type=int, default=None, help="first N easy-VQA test questions (default: all 9,673)")
    parser.add_argument("--text-limit", type=int, default=None, help="first N held-out same-task text answers (default: all)")
    parser.add_argument(
        "--prose-windows", type=int, default=64, help="256-token windows of unseen English prose to score (default: %(default)s)"
    )
    parser.add_argument(
        "--answer-tokens", type=int, default=128, help="most new tokens per answer to the held-out text prompts (default: %(default)s)"
    )
    parser.add_argument("--caption-limit", type=int, default=200, help="held-out images to caption")
    parser.add_argument("--batch-size", type=int, default=64)
    ns = parser.parse_args(args)
    processes = Processes.from_environment()  # torchrun --nproc-per-node N: each answers its share
    if ns.tasks is not None:
        names = [name.strip() for name in ns.tasks.split(",") if name.strip()]
        if malformed := [root for root in ns.root if "=" not in root]:
            parser.error(f"--root takes TASK=DIR, got {malformed}")
        roots = dict(root.split("=", 1) for root in ns.root)
        try:
            results, path = evaluate_tasks(
                ns.ckpt, names, roots, ns.choice, ns.batch_size, ns.limit, load=_load_options(ns), processes=processes
            )
        except (FileNotFoundError, BenchmarkFileError, UnknownTask) as err:  # the message names the file or task and the fix
            parser.exit(2, f"owl-lightning eval: {err}\n")
        if processes.is_main:
            print(tasks_table(results, names))
            print(path)
        return
    results, path = evaluate(
        ns.ckpt,
        ns.data,
        ns.vqa_limit,
        ns.text_limit,
        ns.caption_limit,
        ns.batch_size,
        load=_load_options(ns),
        prose_windows=ns.prose_windows,
        answer_tokens=ns.answer_tokens,
        processes=processes,
    )
    if not processes.is_main:
        return
    print(summary_table(results))
    print(path)


def _chat_main(args: list[str]) -> None:
    from pathlib import Path

    from owl_lightning.data.health import SkipSample
    from owl_lightning.data.images import decode_image
    from owl_lightning.inference import ChatSession, OwlAssistant

    parser = argparse.ArgumentParser(
        prog="owl-lightning chat",
        description="Chat about images and video clips with a trained model. Type /reset to start over, /quit (or Ctrl-D) to leave.",
    )
    _add_loading_arguments(parser)
    # One list in command-line order: the placeholders open the first question in that order.
    parser.add_argument(
        "--image",
        action="append",
        dest="media",
        type=lambda path: ("image", path),
        default=[],
        metavar="FILE",
        help="an image file (repeat for several)",
    )
    parser.add_argument(
        "--video",
        action="append",
        dest="media",
        type=lambda path: ("video", path),
        metavar="FILE",
        help="a video clip (mp4, webm, mkv, mov, gif; repeat for several): video.num_frames frames sampled uniformly (docs/video.md)",
    )
    parser.add_argument("--prompt", help="answer this once and exit")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    ns = parser.parse_args(args)
    assistant = OwlAssistant.from_checkpoint(ns.ckpt, **asdict(_load_options(ns)))
    images = []
    for kind, path in ns.media:
        try:
            images.append(decode_image(Path(path)) if kind == "image" else assistant.read_video(Path(path)))
        except SkipSample as err:
            parser.error(f"cannot read {kind} {path}: {err}")
    session = ChatSession(assistant, images, ns.max_new_tokens, ns.temperature)
    if ns.prompt is not None:
        print(session.ask(ns.prompt))
        return
    clips = sum(kind == "video" for kind, _ in ns.media)
    print(f"{len(images) - clips} image(s) and {clips} clip(s) loaded. /reset starts over, /quit leaves.")
    while True:
        try:
            text = input("you> ").strip()
        except EOFError:
            break
        if text == "/quit":
            break
        if text == "/reset":
            session.reset()
            continue
        if text:
            print(f"owl> {session.ask(text)}")


def _owleval_main(args: list[str]) -> None:
    from owl_lightning.apps.eval.processes import Processes
    from owl_lightning.apps.owleval import DEFAULT_DATA, OwlEvalError, run_owleval

    parser = argparse.ArgumentParser(
        prog="owl-lightning owleval",
        description="Answer the 82 OwlEval questions (the mPLUG-Owl "
        "paper's benchmark) with a checkpoint, into an answer file in the official format. "
        "Multi-turn questions about one image are asked in one conversation, in question_id order.",
    )
    _add_loading_arguments(parser)
    parser.add_argument("--data", default=DEFAULT_DATA, help="the OwlEval folder: questions.jsonl, cases/ (default: %(default)s)")
    parser.add_argument("--out", required=True, help="the answer file to write (JSONL)")
    parser.add_argument("--model-id", help="the model_id written on every line (default: owl-lightning:<run folder name>)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    ns = parser.parse_args(args)
    processes = Processes.from_environment()  # torchrun --nproc-per-node N: each answers its share
    try:
        path = run_owleval(
            ns.ckpt,
            ns.data,
            ns.out,
            ns.model_id,
            ns.batch_size,
            ns.max_new_tokens,
            ns.temperature,
            load=_load_options(ns),
            processes=processes,
        )
    except (OwlEvalError, FileNotFoundError) as err:
        parser.error(str(err))
    if processes.is_main:
        print(f"answers: {path}\nrate them blind beside the published ones: owl-lightning rate --answers {ns.data}/answer --answers {path}")


def _rate_main(args: list[str]) -> None:
    from owl_lightning.apps.owleval import DEFAULT_DATA, OwlEvalError
    from owl_lightning.apps.web import serve
    from owl_lightning.apps.web.rate import open_rating

    parser = argparse.ArgumentParser(
        prog="owl-lightning rate",
        description="Rate OwlEval answers blind in a browser "
        "(A/B/C/D, the paper's scale): every system's answer to a question, anonymised and "
        "shuffled. Each click is saved at once to the ratings file; the summary view (revealed "
        "at the end in blind mode), or --summary, gives the paper's table.",
    )
    parser.add_argument(
        "--answers", action="append", required=True, help="an answer file, or a folder of *.jsonl answer files (repeat for several)"
    )
    parser.add_argument("--data", default=DEFAULT_DATA, help="the OwlEval folder: questions.jsonl, cases/ (default: %(default)s)")
    parser.add_argument("--ratings", default="runs/owleval_ratings.jsonl", help="where ratings are kept (default: %(default)s)")
    parser.add_argument("--port", type=int, default=7861, help="port on 127.0.0.1 (0: any free port; default: %(default)s)")
    parser.add_argument(
        "--blind",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep the page's per-system summary hidden until the rater reveals it at the end (default: on)",
    )
    parser.add_argument("--summary", action="store_true", help="print the A/B/C/D table as Markdown and exit")
    ns = parser.parse_args(args)
    try:
        app = open_rating(ns.data, ns.answers, ns.ratings, blind=ns.blind)
    except OwlEvalError as err:
        parser.error(str(err))
    if ns.summary:
        print(app.summary()["markdown"])
        return
    skipped = len(app.ratings.unreadable_lines)
    where = f"ratings in {ns.ratings}" + (f" ({skipped} unreadable line(s) skipped, see above)" if skipped else "")
    serve(app, ns.port, f"rating {len(app.files)} systems on {len(app.questions)} questions, {where}")


def _serve_main(args: list[str]) -> None:
    import os

    from owl_lightning.apps.web import serve
    from owl_lightning.apps.web.openai_api import API_KEY_ENV, OpenAIApp
    from owl_lightning.inference import OwlAssistant

    parser = argparse.ArgumentParser(
        prog="owl-lightning serve",
        description="Chat with a trained model in a browser (upload images, ask over several turns, adjust max tokens and "
        "temperature), or from any OpenAI client: the same server speaks the chat-completions API under /v1/, "
        "answering concurrent requests in shared batches.",
    )
    _add_loading_arguments(parser)
    parser.add_argument("--port", type=int, default=7860, help="port on 127.0.0.1 (0: any free port; default: %(default)s)")
    parser.add_argument(
        "--max-new-tokens", type=int, default=128, help="the page's starting value; the API's max_tokens when a request has none"
    )
    parser.add_argument(
        "--temperature", type=float, default=0.0, help="the page's starting value; the API's when a request has none (0: greedy)"
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV),
        help=f"the key API clients send as 'Authorization: Bearer KEY' (default: ${API_KEY_ENV}, else a new key printed at "
        "start; the environment variable keeps it out of the process list)",
    )
    parser.add_argument("--model-name", default=None, help="the model name API clients use (default: the --ckpt value)")
    parser.add_argument(
        "--allow-image-urls",
        action="store_true",
        help="let API requests name images by http(s) URL, which the server then fetches (10 s, within the request's "
        "64 MiB): only for clients you trust, as it will fetch any address they give, on your network too",
    )
    parser.add_argument("--max-batch", type=int, default=8, help="most API requests answered in one batch (default: %(default)s)")
    parser.add_argument(
        "--batch-window-ms",
        type=float,
        default=20.0,
        help="how long a request waits for others to share its batch (default: %(default)s)",
    )
    ns = parser.parse_args(args)
    if ns.max_batch < 1 or ns.batch_window_ms < 0:
        parser.error("--max-batch must be at least 1 and --batch-window-ms at least 0")
    if ns.api_key is not None and not ns.api_key.strip():
        parser.error(f"the API key is empty: pass a non-empty --api-key or ${API_KEY_ENV}, or neither for a new key")
    try:
        assistant = OwlAssistant.from_checkpoint(ns.ckpt, **asdict(_load_options(ns)))
    except FileNotFoundError as err:
        parser.error(str(err))
    app = OpenAIApp(
        assistant,
        model_name=ns.model_name or str(ns.ckpt),
        api_key=ns.api_key,
        allow_image_urls=ns.allow_image_urls,
        max_batch=ns.max_batch,
        batch_window_s=ns.batch_window_ms / 1000,
        max_new_tokens=ns.max_new_tokens,
        temperature=ns.temperature,
        title=str(ns.ckpt),
    )
    serve(app, ns.port, "chat demo")


def _export_main(args: list[str]) -> None:
    from owl_lightning.checkpoints import export_checkpoint

    parser = argparse.ArgumentParser(
        prog="owl-lightning export",
        description="Export a checkpoint for tools outside "
        "owl_lightning: DIR/llm (LoRA merged, tokenizer with <image>), DIR/vision.safetensors, "
        "DIR/abstractor.safetensors, DIR/lora (the adapter, stage 2), DIR/owl.json.",
    )
    _add_loading_arguments(parser, inference=False)
    parser.add_argument("--out", required=True, help="the folder to write (replaces an earlier export there)")
    ns = parser.parse_args(args)
    try:
        print(export_checkpoint(ns.ckpt, ns.out, ns.llm_source, ns.trust_remote_code))
    except (FileNotFoundError, FileExistsError) as err:
        parser.error(str(err))


def _convert_official_main(args: list[str]) -> None:
    from owl_lightning.apps.official import write_official_export

    parser = argparse.ArgumentParser(
        prog="owl-lightning convert-official",
        description="Convert the official mPLUG-Owl "
        "v1 weights (Hugging Face folder) into an exported folder to chat with or start stage 2 from.",
    )
    parser.add_argument(
        "--src",
        action="append",
        required=True,
        help="an official model folder or file; repeat to add a LoRA adapter saved by peft after the full model",
    )
    parser.add_argument("--out", required=True, help="the folder to write")
    parser.add_argument("--config", default="owl-llama7b", help=f"our config of the same sizes: {', '.join(list_configs())}")
    parser.add_argument(
        "--overrides",
        type=json.loads,
        default=None,
        help='dotted-key changes to it as JSON, e.g. \'{"llm.tokenizer": "path/to/llama-tokenizer"}\'',
    )
    ns = parser.parse_args(args)
    try:
        out = write_official_export(ns.src, ns.out, get_config(ns.config, ns.overrides))
    except (KeyError, ValueError, FileNotFoundError, FileExistsError) as err:
        parser.error(str(err.args[0]) if isinstance(err, KeyError) else str(err))
    overrides = json.dumps({**(ns.overrides or {}), "llm.source": str(out / "llm")})
    print(
        f"{out}\nchat:    owl-lightning chat --ckpt {out} --image a.jpg\n"
        f"stage 2: owl-lightning stage2 fit --config experiments/stage2_llama7b.yaml --model.init_from {out} "
        f"--model.model_overrides '{overrides}'"
    )


def _consolidate_main(args: list[str]) -> None:
    from owl_lightning.checkpoints import consolidate, is_sharded_checkpoint, resolve_checkpoint

    parser = argparse.ArgumentParser(
        prog="owl-lightning consolidate",
        description="Join the shards of an FSDP checkpoint "
        "(ModelParallelStrategy saves a folder, one file per process) into one .ckpt file: "
        "weights, optimizer state, loop state and config. It resumes on any number of "
        "processes and loads anywhere a checkpoint is taken (eval, chat, export, init_from).",
    )
    parser.add_argument("checkpoint", help="a sharded checkpoint folder (e.g. runs/x/checkpoints/last.ckpt) or its run folder")
    parser.add_argument("out", help="the .ckpt file to write")
    ns = parser.parse_args(args)
    try:
        path = resolve_checkpoint(ns.checkpoint)
    except FileNotFoundError as err:
        parser.error(str(err))
    if not is_sharded_checkpoint(path):
        parser.error(
            f"{ns.checkpoint} is not a sharded checkpoint folder (one holding meta.pt and .distcp files) nor a run folder with one"
        )
    print(consolidate(path, ns.out))


COMMANDS = {
    "stage1": lambda a: _stage_cli("stage1", a),
    "stage2": lambda a: _stage_cli("stage2", a),
    "describe": _describe_main,
    "data": _data_main,
    "eval": _eval_main,
    "chat": _chat_main,
    "owleval": _owleval_main,
    "rate": _rate_main,
    "serve": _serve_main,
    "export": _export_main,
    "convert-official": _convert_official_main,
    "consolidate": _consolidate_main,
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    # bitsandbytes (imported by peft when installed) warns at import that the optional `kernels` package is
    # missing; that package would fetch code from the Hugging Face Hub, so its fallback is the path we want.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(USAGE)
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    if argv[0] in ("stage1", "stage2"):
        COMMANDS[argv[0]](argv[1:])
        return
    from owl_lightning.checkpoints import UntrustedCheckpoint

    try:
        COMMANDS[argv[0]](argv[1:])
    except (UntrustedCheckpoint, FileNotFoundError) as err:  # what the user passed: no traceback, the reason and the fix
        sys.exit(f"owl-lightning {argv[0]}: error: {err}")


if __name__ == "__main__":
    main()
