"""`maas generate "prompt"` and `maas chat "message"`: text generation through the router, streamed as it goes."""

from __future__ import annotations

import json
import sys
from typing import Optional

import typer

from maas.cli.mesh import AliasOpt, JsonOpt, KeyOpt, RouterOpt, VersionOpt, fail, routed_text, err_console
from maas.client import MeshClient, MeshError

ModelOpt = typer.Option("smollm2", "--model", "-m", help="a generation model")
MaxTokensOpt = typer.Option(0, "--max-tokens", "-n", help="tokens to generate (0 = the server's default)")
TemperatureOpt = typer.Option(None, "--temperature", "-t", help="0 = greedy (the default)")
TopPOpt = typer.Option(None, "--top-p")
TopKOpt = typer.Option(0, "--top-k", help="0 = off")
SeedOpt = typer.Option(None, "--seed", help="same seed, prompt and version → same text")
StopOpt = typer.Option(None, "--stop", help="a text that ends the answer (repeatable)")
NoStreamOpt = typer.Option(False, "--no-stream", help="wait for the whole answer instead of streaming it")
TimeoutOpt = typer.Option(120.0, "--timeout", help="deadline in seconds")


def _run(call, stream: bool, as_json: bool, **kwargs) -> None:
    """Stream pieces to stdout as they arrive (or print the unary answer); --json prints one object at the end."""
    stream = stream and not as_json
    try:
        if not stream:
            result = call(stream=False, **kwargs)
            text, finish, usage, routed = result.text, result.finish_reason, result.usage, result.routed
            if not as_json:
                print(text)
        else:
            with call(stream=True, **kwargs) as pieces:
                for piece in pieces:
                    sys.stdout.write(piece.text)
                    sys.stdout.flush()
                print()
                text, finish, usage, routed = pieces.text, pieces.finish_reason, pieces.usage, pieces.routed
    except (MeshError, ValueError) as exc:
        fail(str(exc))
    except KeyboardInterrupt:  # the `with` cancelled the generation in the mesh
        raise typer.Exit(130) from None
    if as_json:
        print(
            json.dumps(
                {
                    "text": text,
                    "finish_reason": finish,
                    "usage": usage.__dict__ if usage else None,
                    "routed": routed.__dict__ if routed else None,
                },
                ensure_ascii=False,
            )
        )
    else:
        tokens = f"{usage.prompt_tokens} prompt + {usage.completion_tokens} completion tokens" if usage else ""
        err_console.print(f"[dim]{finish or '?'} · {tokens} · {routed_text(routed) if routed else ''}[/]")


def generate(
    prompt: str = typer.Argument(..., help="raw prompt (no chat template)"),
    model: str = ModelOpt,
    max_tokens: int = MaxTokensOpt,
    temperature: Optional[float] = TemperatureOpt,
    top_p: Optional[float] = TopPOpt,
    top_k: int = TopKOpt,
    seed: Optional[int] = SeedOpt,
    stop: Optional[list[str]] = StopOpt,
    version: Optional[int] = VersionOpt,
    alias: Optional[str] = AliasOpt,
    routing_key: Optional[str] = KeyOpt,
    router: str = RouterOpt,
    no_stream: bool = NoStreamOpt,
    as_json: bool = JsonOpt,
    timeout: float = TimeoutOpt,
) -> None:
    """Continue a raw prompt, streaming the text as it is generated."""
    with MeshClient(router, timeout=timeout) as client:
        _run(
            client.generate,
            not no_stream,
            as_json,
            prompt=prompt,
            model=model,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            stop=stop or (),
            version=version,
            alias=alias,
            routing_key=routing_key,
        )


def chat(
    message: str = typer.Argument(..., help="your message"),
    system: Optional[str] = typer.Option(None, "--system", "-s", help="a system message first"),
    model: str = ModelOpt,
    max_tokens: int = MaxTokensOpt,
    temperature: Optional[float] = TemperatureOpt,
    top_p: Optional[float] = TopPOpt,
    top_k: int = TopKOpt,
    seed: Optional[int] = SeedOpt,
    stop: Optional[list[str]] = StopOpt,
    version: Optional[int] = VersionOpt,
    alias: Optional[str] = AliasOpt,
    routing_key: Optional[str] = KeyOpt,
    router: str = RouterOpt,
    no_stream: bool = NoStreamOpt,
    as_json: bool = JsonOpt,
    timeout: float = TimeoutOpt,
) -> None:
    """Ask the chat model (its own chat template), streaming the answer as it is generated."""
    messages = ([("system", system)] if system else []) + [("user", message)]
    with MeshClient(router, timeout=timeout) as client:
        _run(
            client.chat,
            not no_stream,
            as_json,
            messages=messages,
            model=model,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            stop=stop or (),
            version=version,
            alias=alias,
            routing_key=routing_key,
        )


def register(app: typer.Typer) -> None:
    app.command(help="Generate text from a raw prompt through the router (streamed).")(generate)
    app.command(help="Chat with a generation model through the router (streamed).")(chat)
