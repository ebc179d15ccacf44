"""moe-server: an OpenAI-compatible HTTP server over a GGUF MoE model (llama-server's flags where hotcold has
the feature): continuous batching over --parallel slots, every residency flag of moe-run.

    moe-server model.gguf --host 127.0.0.1 --port 8080 --parallel 8 [--schedule task --predictor pred.npz]
"""
from __future__ import annotations

import argparse
import sys
import threading
import time

from hotcold.engine.options import Options, Schedule

from .flags import Parser, add_model, add_options, given, guarded, model_arg


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="moe-server", description="Serve a GGUF MoE model with OpenAI's API (/v1/completions, "
               "/v1/chat/completions, /v1/models, /health, /metrics). Requests decode together in --parallel slots, "
               "each with a context of -c tokens; more wait in a queue.")
    add_model(p, "llama-server")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="port to listen on (default 8080)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/ requests")
    p.add_argument("-a", "--alias", default=None, help="the model id clients give (default: the file's name)")
    add_options(p, Options, server=True)
    return p


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    model_arg(p, args, "moe-server MODEL or moe-server -m MODEL")
    if not 0 < args.port < 65536:
        p.error(f"--port {args.port}: give a port in 1..65535")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)

    def run() -> None:
        try:
            import uvicorn

            from hotcold.engine.server.app import create_app
        except ImportError as e:
            raise ImportError(f"moe-server needs the server extra: pip install 'hotcold[server]' ({e.name} is "
                              "missing)") from None
        from hotcold.engine.api import Model
        from hotcold.engine.batch import BatchEngine

        options = given(args, Options)
        options.setdefault("n_seq_max", 4)   # llama-server's default of 4 slots
        m = Model.load(args.model, **options)
        engine = BatchEngine(m)
        app = create_app(m, engine, api_key=args.api_key, name=args.alias)
        server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port,
                                               log_level="info" if m.verbose else "warning"))
        # HTTP on a thread, the engine on this one: the thread that compiled and warmed the kernels
        # (engine/batch.py says why that matters)
        http = threading.Thread(target=server.run, name="moe-server-http", daemon=True)
        http.start()
        while not server.started:
            if not http.is_alive():
                raise OSError(f"cannot listen on {args.host}:{args.port} (in use, or not an address of this machine)")
            time.sleep(0.05)
        print(f"moe-server: {m.path.name} on http://{args.host}:{args.port}/v1 ({m.ctx.n_seq} slots of "
              f"{m.n_ctx} tokens, {m.options.schedule.value} schedule)", file=sys.stderr, flush=True)
        if m.options.schedule is Schedule.TASK and m.predictor is None:
            print("moe-server: --schedule task without --predictor orders the queue by slo_ms and max_tokens only "
                  "(give --predictor pred.npz, made by moe-predictor train, for predicted lengths and expert "
                  "overlap)", file=sys.stderr, flush=True)
        watch = threading.Thread(target=lambda: (http.join(), engine.close()), daemon=True)
        watch.start()                                # the HTTP side ending (a signal) ends the engine
        try:
            engine.run()
        finally:
            server.should_exit = True
            http.join(10)

    return guarded("moe-server", run, "; lower -c (--ctx-size) or --parallel")


if __name__ == "__main__":
    sys.exit(main())
