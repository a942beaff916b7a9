"""Small helpers shared by every stage."""
from __future__ import annotations

import argparse
import os
import sys


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def log(msg: str) -> None:
    """Print once per job (rank 0 only), flushed so it interleaves with the Trainer's output."""
    if is_main_process():
        print(f"[vlft] {msg}", file=sys.stderr, flush=True)


def closest_flag(name: str, known) -> str | None:
    """The known flag nearest to a mistyped one (`difflib`'s ratio, cutoff 0.6), without dashes; None when none
    is close. `name` and `known` are flag names without the leading `--`."""
    import difflib

    match = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
    return match[0] if match else None


class FlagParser(argparse.ArgumentParser):
    """The argparse parser of the commands that do not parse dataclasses (merge, plot, plan, tiny-model), with the
    errors of those that do (vlft.config.parse_command): one line `PROG: error: MESSAGE`, no usage dump, exit status
    2 (argparse's), an unknown flag named with the nearest known one (vlft.cli.unknown_flag_error, closest_flag).
    Flags are taken by their full names only: argparse's prefix matching would read LLaMA-Factory's lora_target flag
    as another flag."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def known_flags(self) -> set[str]:
        """This parser's flag names, without the leading dashes."""
        return {option.lstrip("-") for action in self._actions for option in action.option_strings
                if option.startswith("--")}

    def unknown_flags(self, argv: list[str]) -> list[str]:
        """The `--` flags of `argv` (as typed, without `=value`) that are no flag of this parser; read before
        parsing, so that a mistyped required flag is named rather than reported missing."""
        known = self.known_flags()
        unknown = []
        for arg in argv:
            if arg == "--":
                break
            name = arg[2:].split("=", 1)[0]
            if arg.startswith("--") and name not in known:
                unknown.append(arg.split("=", 1)[0])
        return unknown

    def parse_args(self, args=None, namespace=None):
        """argparse's parse_args, with the flags it does not know refused with the nearest one, where argparse
        would say `unrecognized arguments` (or, for a mistyped required flag, that the flag is missing)."""
        argv = sys.argv[1:] if args is None else list(args)
        flags = self.unknown_flags(argv)
        if not flags:
            parsed, extra = self.parse_known_args(argv, namespace)
            flags = [arg.split("=", 1)[0] for arg in extra if arg.startswith("-")]
            if extra and not flags:
                self.error(f"unexpected value(s) {' '.join(extra)}")
        if flags:
            from vlft.cli import unknown_flag_error

            self.exit(2, f"{self.prog}: error: {unknown_flag_error(flags, self.known_flags())}\n")
        return parsed

    def error(self, message: str):
        """Exit with status 2 after one line naming the problem (argparse's contract: error() does not return)."""
        self.exit(2, f"{self.prog}: error: {message} (run with --help for the list of flags)\n")


def quiet_third_party(argv: list[str]) -> None:
    """Silence the libraries' start-up lines that the user cannot act on; call it before they are imported.

    - bitsandbytes >= 0.49 warns on every import on an AVX512-BF16 CPU that its optional `kernels` package is
      missing (a faster CPU 4-bit matmul); the slower built-in path is used, nothing is wrong.
    - DeepSpeed warns "Setting accelerator to CPU" whenever it is imported on a machine without CUDA (transformers
      and PEFT import it to ask whether ZeRO-3 is on). Kept for a run that passes --deepspeed, where it matters.
    - transformers >= 5.2x renamed gradient_checkpointing* to activation_checkpointing* and warns (FutureWarning)
      each time TRL, PEFT or the Trainer call the old methods; vlft accepts the old flag names on purpose (2U1
      scripts; config._rename_checkpointing_flags), so neither is the user's to change.
    """
    import logging
    import warnings

    warnings.filterwarnings("ignore", message=r"`(is_)?gradient_checkpointing(_enable|_disable|_kwargs)?` is deprecated",
                            category=FutureWarning)

    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    deepspeed = logging.getLogger("DeepSpeed")  # the logger DeepSpeed creates at import keeps this object's filters
    ours = [f for f in deepspeed.filters if isinstance(f, _NotMessage)]
    if any(a == "--deepspeed" or a.startswith("--deepspeed=") for a in argv):
        for f in ours:
            deepspeed.removeFilter(f)
    elif not ours:
        deepspeed.addFilter(_NotMessage("Setting accelerator to CPU"))


class _NotMessage:
    """A logging filter that drops the records whose message starts with `prefix`."""

    def __init__(self, prefix: str):
        self.prefix = prefix

    def filter(self, record) -> bool:
        return not str(record.msg).startswith(self.prefix)


# --- the Hugging Face hub: fail fast when it cannot be reached --------------------------------------------------
HUB_PROBE_TIMEOUT_S = 3.0
_hub_reachable: bool | None = None  # one probe per process


def _truthy(value: str | None) -> bool:
    return (value or "").strip().upper() in ("1", "ON", "YES", "TRUE")


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or transformers' TRANSFORMERS_OFFLINE) is set: huggingface_hub reads the cache only."""
    return _truthy(os.environ.get("HF_HUB_OFFLINE")) or _truthy(os.environ.get("TRANSFORMERS_OFFLINE"))


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def _probe_address() -> tuple[str, int]:
    """(host, port) a download would connect to first: the HTTPS proxy when one is set for the endpoint's host
    (urllib's reading of https_proxy / no_proxy), else the endpoint itself."""
    import urllib.parse
    import urllib.request

    url = urllib.parse.urlsplit(hub_endpoint())
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(url.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        proxy_url = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = proxy_url.hostname or host, proxy_url.port or 80
    return host, port


def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the hub (or its proxy) opens within `timeout` seconds, name lookup included
    (run in a thread: getaddrinfo has no timeout of its own). Probed once per process."""
    global _hub_reachable
    if _hub_reachable is None:
        import socket
        import threading

        result: list[bool] = []

        def connect():
            try:
                with socket.create_connection(_probe_address(), timeout=timeout):
                    result.append(True)
            except (OSError, ValueError):
                result.append(False)

        thread = threading.Thread(target=connect, daemon=True)
        thread.start()
        thread.join(timeout + 0.5)
        _hub_reachable = bool(result and result[0])
    return _hub_reachable


def _looks_local(model_id: str) -> bool:
    """A path rather than a hub id `name` or `org/name` (the rule of models/loading.py's load errors)."""
    return model_id.startswith((".", "/", "~")) or model_id.count("/") > 1 or os.sep + os.sep in model_id


def hub_cached(model_id: str) -> bool:
    """Whether the Hugging Face cache holds `model_id`'s config.json (huggingface_hub's cache layout and
    HF_HOME / HF_HUB_CACHE rules)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(model_id, "config.json"), str)
    except Exception:  # an id the hub would refuse (HFValidationError) is not in the cache either
        return False


def check_model_source(model_id: str | None, flag: str = "--model_id") -> None:
    """Fail fast, before any download, when `model_id` can only come from a hub that does not answer.

    Nothing is checked for a local directory, a path-like id (the loader names a missing directory), or under
    HF_HUB_OFFLINE. A hub id is probed (TCP connect within HUB_PROBE_TIMEOUT_S): unreachable and not cached is a
    VlftError saying what to do; unreachable but cached sets HF_HUB_OFFLINE=1 for this process (huggingface_hub
    would otherwise retry the hub for every file before it falls back to the cache), with a log line.
    Raises VlftError naming `flag`."""
    if not model_id or hub_offline() or os.path.isdir(os.path.expanduser(model_id)) or _looks_local(model_id):
        return
    if hub_reachable():
        return
    if hub_cached(model_id):
        os.environ["HF_HUB_OFFLINE"] = "1"
        import huggingface_hub.constants

        huggingface_hub.constants.HF_HUB_OFFLINE = True  # read at its import, which may have happened already
        log(f"the Hugging Face hub ({hub_endpoint()}) cannot be reached; using the cached copy of {model_id} "
            "(HF_HUB_OFFLINE=1 for this run)")
        return
    from vlft.errors import VlftError

    example = f"{flag} /path/to/model, " if flag.startswith("--") else ""
    raise VlftError(
        f"{flag} {model_id}: not a local directory and not in the Hugging Face cache, and the hub ({hub_endpoint()}) "
        f"does not answer within {HUB_PROBE_TIMEOUT_S:g} s. Give a local checkpoint directory instead ({example}e.g. "
        f"downloaded elsewhere with `hf download {model_id} --local-dir DIR` and copied here), or, for a model in a "
        "Hugging Face cache, point HF_HOME at that cache and set HF_HUB_OFFLINE=1.")
