"""llama.cpp's OpenAI-compatible server, loading its model the way the embedded backend does.

    python -m voicebus.workers.llm.serve --model FILE.gguf [--port 8000] [--repack auto|on|off] [OPTIONS]

``python -m llama_cpp.server`` (llama-cpp-python[server]) lets llama.cpp repack
the weights wherever it can; on CPUs with AMX that crashes the server at the
first multi-token prompt (llama.cpp issue 20824, see ``cpu``), and the client
sees only a stream cut short. This is the same server, with the same options,
whose model is loaded under the decision of ``llm.repack`` (``--repack``,
default auto): a local chat server for ``--llm openai``, or for the chat model
on another host, that works on any machine.
"""

from __future__ import annotations

import argparse
import os
import sys

from voicebus.workers.llm.cpu import REPACK_CHOICES, cpu_report, decide_repack
from voicebus.workers.llm.local import model_defaults


def main(argv: list[str] | None = None) -> None:
    import uvicorn
    from llama_cpp.server.app import create_app
    from llama_cpp.server.cli import add_args_from_model, parse_model_from_args
    from llama_cpp.server.settings import ModelSettings, ServerSettings, Settings

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repack", choices=REPACK_CHOICES, default="auto",
                        help="llama.cpp weight repacking (auto: off where the CPU has AMX)")
    add_args_from_model(parser, Settings)
    args = parser.parse_args(argv)
    server = parse_model_from_args(ServerSettings, args)
    model = parse_model_from_args(ModelSettings, args)
    choice = decide_repack(args.repack, cpu_report())
    print(f"voicebus: llama.cpp {choice.describe()}", file=sys.stderr, flush=True)
    with model_defaults(use_extra_bufts=choice.use_extra_bufts):  # create_app loads the model
        app = create_app(server_settings=server, model_settings=[model])
    uvicorn.run(app, host=os.getenv("HOST", server.host), port=int(os.getenv("PORT", server.port)),
                ssl_keyfile=server.ssl_keyfile, ssl_certfile=server.ssl_certfile)


if __name__ == "__main__":
    main()
