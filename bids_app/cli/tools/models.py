"""``msxplain-tools models``: pull, list, describe and verify models.

* ``pull SPEC...``: fetch registry names, ``doi:10.5281/zenodo.<id>``, ``zenodo:<id>[/<file>]`` or
  ``https://`` URLs into the model cache (``$MSXPLAIN_HOME/models``), checked (size, checksum,
  nnU-Net layout), once; a later ``msxplain --model SPEC`` uses the cached copy, offline too.
* ``list``: the registry's names, installed names and the cache's entries.
* ``info SPEC``: the registry entry, the cached entry's source record, or (online) the Zenodo
  record's files.
* ``verify SPEC``: check a cached, installed or local model (card, SHA-256 of every checkpoint,
  of plans.json and dataset.json, class-name allow-lists), never touching the network.

Exit codes as for ``msxplain`` (see docs/models.md): 64 usage, 65 corrupt download or model, 66
not found / not cached while offline, 75 network failure (a retry may succeed).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

NAME = "models"
HELP = "pull, list, describe and verify models (registry names, Zenodo DOIs, URLs)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--offline", action="store_true",
                        help="never use the network (same as MSXPLAIN_OFFLINE=1): only cached models")
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    pull = sub.add_parser("pull", parents=[common], help="fetch models into the model cache ($MSXPLAIN_HOME/models)")
    pull.add_argument("specs", nargs="+", metavar="SPEC",
                      help="registry name, doi:10.5281/zenodo.<id>, zenodo:<id>[/<file>] or https:// URL")
    pull.add_argument("--install-into", metavar="DIR", default=None,
                      help="also copy each pulled model to DIR/<name> (a registry name, else the cache key) and "
                      "verify it there: with MSXPLAIN_MODELS=DIR, --model <name> then needs no cache, no network "
                      "and no write (container images bake models in this way)")
    sub.add_parser("list", parents=[common], help="the registry's models, installed models and the cache's entries")
    info = sub.add_parser("info", parents=[common],
                          help="what is known about a model (registry entry, cached source record, Zenodo files)")
    info.add_argument("spec", metavar="SPEC")
    info.add_argument("--json", action="store_true", help="print JSON")
    verify = sub.add_parser("verify", help="check a cached, installed or local model's files and checksums "
                                           "(no network)")
    verify.add_argument("spec", metavar="SPEC")


def run(args) -> int:
    before = os.environ.get("MSXPLAIN_OFFLINE")
    if getattr(args, "offline", False) or args.action == "verify":
        os.environ["MSXPLAIN_OFFLINE"] = "1"
    try:
        return {"pull": _pull, "list": _list, "info": _info, "verify": _verify}[args.action](args)
    finally:
        if before is None:
            os.environ.pop("MSXPLAIN_OFFLINE", None)
        else:
            os.environ["MSXPLAIN_OFFLINE"] = before


def _pull(args) -> int:
    from bids_app.model.cache import source_of
    from bids_app.model.registry import remote_source
    from bids_app.model.resolve import resolve_model

    for spec in args.specs:
        model = resolve_model(spec)
        record = source_of(model.trainer_dir) or {}
        source = remote_source(spec)
        if source is None:
            print(f"{spec}: {model.trainer_dir} (local or bundled: nothing to fetch)")
            continue
        print(f"{spec}: {model.trainer_dir} (SHA-256 of the archive {record.get('sha256')})")
        if args.install_into:
            _install(spec, source, Path(args.install_into))
    return 0


def _install(spec: str, source, models_dir: Path) -> None:
    """Copy the pulled entry of ``spec`` to ``models_dir/<name>`` and verify it as a run would,
    found by name through ``$MSXPLAIN_MODELS`` with the network and the cache out of reach."""
    from bids_app.errors import UsageError
    from bids_app.model.cache import cached_entry, install_entry
    from bids_app.model.resolve import MODELS_PATH_ENV, check_consistency, resolve_model, select_members, verify_members

    name = source.registry_name or source.cache_key
    target = install_entry(cached_entry(source), models_dir, name)
    saved = {key: os.environ.get(key) for key in (MODELS_PATH_ENV, "MSXPLAIN_OFFLINE")}
    os.environ[MODELS_PATH_ENV] = str(models_dir.resolve())
    os.environ["MSXPLAIN_OFFLINE"] = "1"
    try:
        model = resolve_model(name)
        if not model.trainer_dir.is_relative_to(target.resolve()):
            raise UsageError(f"--model {name} resolves to {model.trainer_dir}, not to the installed copy {target}.",
                             hint=f"a bundled model has the name {name}; install under another name.")
        check_consistency(model)
        members = select_members(model, None)
        verify_members(model, members)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    print(f"{spec}: installed as {target} (members {', '.join(members)} verified); use --model {name} with "
          f"{MODELS_PATH_ENV}={models_dir}")


def _list(args) -> int:
    from bids_app.model.cache import cache_entries, models_cache
    from bids_app.model.registry import load_registry
    from bids_app.model.resolve import available_model_names

    print("registry:")
    for name, entry in load_registry().items():
        print(f"  {name:16s} {entry.source:40s} {entry.title}")
    print("installed:")
    for name in available_model_names():
        print(f"  {name}")
    print(f"cache ({models_cache()}):")
    for path, record in cache_entries():
        print(f"  {path.name:40s} {record.get('source') or record.get('spec')} sha256={record.get('sha256')}")
    return 0


def _info(args) -> int:
    from bids_app.errors import MissingInput
    from bids_app.model.cache import cached_entry, read_source_record
    from bids_app.model.download import choose_file, models_offline, zenodo_record
    from bids_app.model.registry import registry_entry, remote_source
    from bids_app.model.resolve import find_named_model

    spec = args.spec
    out: dict = {"spec": spec}
    entry = registry_entry(spec)
    if entry is not None:
        out["registry"] = {"name": entry.name, "title": entry.title, "source": entry.source, "file": entry.file,
                           "sha256": entry.sha256, "size": entry.size, "card": entry.card, **entry.extra}
    named = find_named_model(spec)
    if named is not None:
        out["installed"] = str(named)
    source = remote_source(spec)
    if source is not None:
        cached = cached_entry(source)
        out["cache_entry"] = str(cached) if cached else None
        if cached:
            out["source_record"] = read_source_record(cached)
        elif source.kind == "zenodo" and not models_offline():
            record, files = zenodo_record(source.record)
            metadata = record.get("metadata") if isinstance(record.get("metadata"), dict) else {}
            out["zenodo"] = {"record": source.record, "doi": source.doi, "title": metadata.get("title"),
                             "files": [{"key": f.key, "size": f.size, "md5": f.md5} for f in files]}
            try:
                out["zenodo"]["model_file"] = choose_file(files, source.file, source.record).key
            except Exception as exc:  # several zips: say so, the listing is the answer
                out["zenodo"]["model_file"] = None
                out["zenodo"]["note"] = getattr(exc, "message", str(exc))
    if len(out) == 1:
        raise MissingInput(f"Nothing is known about model '{spec}' (not a registry name, installed model, "
                           "DOI, Zenodo record or URL).", hint="see 'msxplain-tools models list'.")
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        _print_tree(out)
    return 0


def _print_tree(obj, indent: int = 0) -> None:
    pad = "  " * indent
    if isinstance(obj, dict):
        for key, value in obj.items():
            if isinstance(value, (dict, list)):
                print(f"{pad}{key}:")
                _print_tree(value, indent + 1)
            else:
                print(f"{pad}{key}: {value}")
    elif isinstance(obj, list):
        for value in obj:
            if isinstance(value, dict):
                print(f"{pad}-")
                _print_tree(value, indent + 1)
            else:
                print(f"{pad}- {value}")


def _verify(args) -> int:
    from bids_app.model.resolve import (
        check_consistency,
        resolve_model,
        select_members,
        verify_members,
        verify_model_files,
    )

    model = resolve_model(args.spec)  # offline: a remote spec must be in the cache
    check_consistency(model)
    verify_model_files(model)
    members = select_members(model, None)
    verify_members(model, members)
    print(f"{args.spec}: {model.trainer_dir}: card {'inferred' if model.card.inferred else 'found'}, "
          f"{len(members)} member checkpoint(s), plans.json and dataset.json verified")
    return 0
