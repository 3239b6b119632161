"""Throughput of ``serve``'s OpenAI-compatible API: 8 concurrent clients against 1 (issue 22, part 4: target at least 4x).

The server is ``owl-lightning serve``'s app (OpenAIApp, batching included) on a free port in a
process of its own, as ``serve`` runs (clients in its process would share its interpreter lock). It
serves owl-smol when its packaged weights are installed (SmolLM2-135M-Instruct, EfficientNet-Lite0;
the abstractor is random, which costs the same as a trained one), owl-tiny otherwise, or a trained
run with ``--ckpt``. Clients are the official ``openai`` client, one thread each, in a closed loop:
send a request, wait for the whole answer, send the next. Every request has one image (a data URL,
one of a few colours) and a question, greedy, at most ``--max-tokens`` tokens.

Reported per concurrency level: completions/s, completion tokens/s (usage.completion_tokens over wall
time) and the mean batch the server generated; then the 8-vs-1 ratios. Results go to
bench/results.json under ``serve_concurrency`` (``--record-as`` for another key; other keys are kept).

    python bench/serve_concurrency.py [--device cuda] [--requests-per-client 8] [--max-tokens 64]
    python bench/serve_concurrency.py --model owl-tiny --requests-per-client 2 --max-tokens 8 --record-as ''   # a smoke test
"""

from __future__ import annotations

import argparse
import base64
import io
import multiprocessing
import queue
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import torch
from PIL import Image

from common import record
from owl_lightning.apps.web import AppServer
from owl_lightning.apps.web.openai_api import OpenAIApp
from owl_lightning.config import get_config
from owl_lightning.inference import OwlAssistant, default_device
from owl_lightning.models.llm import load_tokenizer
from owl_lightning.models.owl import build_owl

MODEL_NAME = "bench"
COLOURS = [(220, 30, 30), (30, 200, 30), (30, 30, 220), (230, 200, 20)]
QUESTIONS = ["Describe this image in detail.", "What colour is this picture?", "What could this be a photo of?"]


def load_assistant(ns: argparse.Namespace) -> tuple[OwlAssistant, str]:
    """The served model and its description: a trained checkpoint, or owl-smol (owl-tiny where its weights are missing)."""
    if ns.ckpt:
        return OwlAssistant.from_checkpoint(ns.ckpt, device=ns.device, precision=ns.precision), str(ns.ckpt)
    for name in [ns.model] if ns.model else ["owl-smol", "owl-tiny"]:
        config = get_config(name)
        try:
            tokenizer = load_tokenizer(config.llm)
            model = build_owl(config, tokenizer=tokenizer)
        except (FileNotFoundError, ImportError) as err:  # the packaged weights are not installed
            print(f"{name} cannot load ({err}); trying the next model")
            continue
        return OwlAssistant(model.to(ns.device), tokenizer, precision=ns.precision), f"{name}, abstractor untrained"
    raise SystemExit("no model could be loaded: install the embedded extra (make install) or pass --ckpt")


def image_url(colour: tuple[int, int, int]) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (224, 224), colour).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def run_clients(base_url: str, api_key: str, clients: int, requests_per_client: int, max_tokens: int) -> dict:
    """``clients`` threads, each sending ``requests_per_client`` requests one after another: totals and wall time."""
    images = [image_url(colour) for colour in COLOURS]
    tokens = []

    def client_loop(number: int) -> None:
        client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=600)
        for k in range(requests_per_client):
            question, image = QUESTIONS[(number + k) % len(QUESTIONS)], images[(number * 3 + k) % len(images)]
            content = [{"type": "text", "text": question}, {"type": "image_url", "image_url": {"url": image}}]
            response = client.chat.completions.create(
                model=MODEL_NAME, messages=[{"role": "user", "content": content}], max_tokens=max_tokens, temperature=0
            )
            tokens.append(response.usage.completion_tokens)

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client_loop, range(clients)))  # list(): a client's exception is raised here
    seconds = time.perf_counter() - started
    return {
        "clients": clients,
        "completions": len(tokens),
        "completion_tokens": sum(tokens),
        "seconds": round(seconds, 3),
        "completions_per_s": round(len(tokens) / seconds, 3),
        "tokens_per_s": round(sum(tokens) / seconds, 1),
    }


def serve_in_this_process(ns: argparse.Namespace, ready: multiprocessing.Queue, batch_sizes: multiprocessing.Queue) -> None:
    """The server process: loads the model, reports (port, key, model, device) on ``ready``, then serves until
    terminated; the size of every batch it generates goes to ``batch_sizes``."""
    assistant, description = load_assistant(ns)
    generate = assistant.generate

    def generate_counted(samples, samplings, listener=None):
        batch_sizes.put(len(samples))
        return generate(samples, samplings, listener)

    assistant.generate = generate_counted
    app = OpenAIApp(assistant, MODEL_NAME, max_batch=ns.max_batch, batch_window_s=ns.batch_window_ms / 1000, max_new_tokens=ns.max_tokens)
    server = AppServer(app)
    device = str(assistant.device) + (f" ({torch.cuda.get_device_name(assistant.device)})" if assistant.device.type == "cuda" else "")
    ready.put((server.server_port, app.api_key, description, device))
    server.serve_forever()


def drain(sizes: multiprocessing.Queue) -> list[int]:
    """The batch sizes reported so far."""
    drained = []
    while True:
        try:
            drained.append(sizes.get(timeout=0.5))
        except queue.Empty:
            return drained


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", default=None, help="a trained run, checkpoint or export (default: owl-smol untrained)")
    parser.add_argument("--model", default=None, help="owl-smol or owl-tiny (default: owl-smol when installed)")
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--precision", default="bf16")
    parser.add_argument(
        "--concurrency", default="1,8", help="client counts to measure, the first being the baseline (default: %(default)s)"
    )
    parser.add_argument("--requests-per-client", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--batch-window-ms", type=float, default=20.0)
    parser.add_argument("--record-as", default="serve_concurrency", help="the key in bench/results.json ('': print only)")
    ns = parser.parse_args()
    levels = [int(level) for level in ns.concurrency.split(",")]

    spawn = multiprocessing.get_context("spawn")  # a fresh interpreter: no CUDA or threads inherited
    ready, batch_sizes = spawn.Queue(), spawn.Queue()
    server = spawn.Process(target=serve_in_this_process, args=(ns, ready, batch_sizes), daemon=True)
    server.start()
    results = {}
    try:
        port, api_key, description, device = ready.get(timeout=900)
        base_url = f"http://127.0.0.1:{port}/v1"
        run_clients(base_url, api_key, max(levels), 1, ns.max_tokens)  # warm-up: first batches, allocator, kernels
        drain(batch_sizes)
        for clients in levels:
            results[clients] = run_clients(base_url, api_key, clients, ns.requests_per_client, ns.max_tokens)
            results[clients]["mean_batch"] = round(statistics.mean(drain(batch_sizes)), 2)
            print(results[clients], flush=True)
    finally:
        server.terminate()
        server.join(timeout=30)
    baseline, top = results[levels[0]], results[levels[-1]]
    entry = {
        "what": f"serve's OpenAI API, {levels[-1]} concurrent clients against {levels[0]} (closed loop, 1 image + question, greedy)",
        "model": description,
        "device": device,
        "precision": ns.precision,
        "max_tokens": ns.max_tokens,
        "max_batch": ns.max_batch,
        "batch_window_ms": ns.batch_window_ms,
        "levels": {str(clients): result for clients, result in results.items()},
        "speedup_completions": round(top["completions_per_s"] / baseline["completions_per_s"], 2),
        "speedup_tokens": round(top["tokens_per_s"] / baseline["tokens_per_s"], 2),
        "target_speedup": 4.0,
    }
    if ns.record_as:
        record(ns.record_as, entry)
    else:
        print(entry)


if __name__ == "__main__":
    main()
