"""``safeclip bank ...``: create, fill, inspect and match banks of known content (:mod:`safeclip.banks`).

``create``, ``add`` (files, folders, or an audit's Parquet output), ``remove | disable | enable | confirm`` (entries,
or ``--all``: the whole bank), ``list``, ``match``, ``hash``, ``import | export`` (PDQ CSV lists, the layout
ThreatExchange and HMA use), ``index``. A file that cannot be read or hashed is one line on stderr, the others are
still done, and the command exits 1; usage and configuration errors exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ._options import (EXIT_FAILED, EXIT_OK, EXIT_USAGE, add_model_args, encoder_spec, number_arg, positive_int,
                       run_standalone)

if TYPE_CHECKING:  # pragma: no cover
    from ..banks import Bank
    from ..moderator import Moderator

__all__ = ["register", "main"]


_bits = number_arg(int, 0, 256, "a whole number of bits")
_similarity = number_arg(float, -1.0, 1.0, "a cosine similarity")
_hours = number_arg(float, 0.0, float("inf"), "a positive number of hours", open_low=True)


def register(subparsers: Any) -> None:
    bank = subparsers.add_parser("bank", help="banks of known content: PDQ hash lists and CLIP exemplars").add_subparsers(
        dest="bank_cmd", required=True)

    p = bank.add_parser("create", help="create an empty bank folder")
    p.add_argument("path", help="the new bank's folder (must not exist, or be empty)")
    p.add_argument("--kind", required=True, choices=("pdq", "embedding"))
    p.add_argument("--dihedral", action="store_true",
                   help="pdq: also hold the 8 rotations and flips of each added image, so turned copies match")
    p.add_argument("--encoder-id", help="embedding: the embedding space's id (instead of loading --model)")
    p.add_argument("--dim", type=positive_int, help="embedding: the embedding dimension (with --encoder-id)")
    p.add_argument("--name", help="the bank's name in decisions (default: the folder's name)")
    p.add_argument("--description", default="")
    add_model_args(p, batch_size=False)
    p.set_defaults(func=_cmd_create)

    p = bank.add_parser("add", help="add image files or folders (or an audit's rows) as entries")
    p.add_argument("bank")
    p.add_argument("files", nargs="*", help="image files and folders (walked recursively for image files)")
    p.add_argument("--label", default="", help="the entries' label (shown in decisions)")
    p.add_argument("--id", dest="entry_id", help="the entry's id (one file only; default: its sha256's first 16 hex)")
    p.add_argument("--replace", action="store_true", help="replace entries whose id is already in the bank")
    p.add_argument("--from-parquet", metavar="FILE",
                   help="add the rows of an audit's output, reusing its PDQ hashes or cached embeddings")
    p.add_argument("--where-action", action="append", choices=("allow", "flag", "block"),
                   help="with --from-parquet: only rows of this action (repeatable)")
    p.add_argument("--cache", help="with --from-parquet, embedding banks: the embedding cache folder (default: "
                                   "$SAFECLIP_CACHE_DIR, else the user cache)")
    add_model_args(p)
    p.set_defaults(func=_cmd_add)

    for name, helptext in (("remove", "remove entries (their ids may be added again)"),
                           ("disable", "stop matching entries (or --all: the whole bank)"),
                           ("enable", "match entries again (or --all: the whole bank)"),
                           ("confirm", "confirm entries after a flood quarantine: they decide again")):
        p = bank.add_parser(name, help=helptext)
        p.add_argument("bank")
        p.add_argument("ids", nargs="*", metavar="ID")
        if name in ("disable", "enable"):
            p.add_argument("--all", action="store_true", help="the whole bank (its entries keep their own state)")
        p.set_defaults(func=_cmd_change, change=name)

    p = bank.add_parser("list", help="list a bank's entries, their state and flood counts")
    p.add_argument("bank")
    p.add_argument("--json", action="store_true", help="one JSON document: the bank, its counts and entries")
    p.add_argument("--quarantine-max-inputs", type=positive_int, default=100,
                   help="mark entries that matched more distinct inputs than this within the window (default 100)")
    p.add_argument("--window-hours", type=_hours, default=24.0, help="the flood window (default 24)")
    p.set_defaults(func=_cmd_list)

    p = bank.add_parser("match", help="match image files against a bank")
    p.add_argument("bank")
    p.add_argument("files", nargs="+")
    p.add_argument("--json", action="store_true", help="one JSON object per file: {path, matches|error}")
    p.add_argument("--max-distance", type=_bits, default=31,
                   help="pdq: the largest Hamming distance that matches (default 31)")
    p.add_argument("--min-similarity", type=_similarity, default=0.94,
                   help="embedding: the smallest cosine similarity that matches (default 0.94)")
    add_model_args(p)
    p.set_defaults(func=_cmd_match)

    p = bank.add_parser("hash", help="print the PDQ hash of image files (hex, quality, path)")
    p.add_argument("files", nargs="+")
    p.add_argument("--json", action="store_true", help="one JSON object per file: {path, pdq, quality|error}")
    p.add_argument("--dihedral", action="store_true", help="also the hashes of the 8 rotations and flips")
    p.set_defaults(func=_cmd_hash)

    p = bank.add_parser("import", help="add a PDQ CSV list (hash,id,labels[,quality,source]), all rows or none")
    p.add_argument("bank")
    p.add_argument("csv")
    p.add_argument("--replace", action="store_true", help="replace entries whose id is already in the bank")
    p.set_defaults(func=_cmd_import)

    p = bank.add_parser("export", help="write a PDQ bank as a CSV list (hash,id,labels,quality,source)")
    p.add_argument("bank")
    p.add_argument("csv")
    p.set_defaults(func=_cmd_export)

    p = bank.add_parser("index", help="rebuild a bank's search index")
    p.add_argument("bank")
    p.set_defaults(func=_cmd_index)


def _say(line: str) -> None:
    print(f"safeclip: {line}", file=sys.stderr, flush=True)


def _report(errors: list[str]) -> int:
    for e in errors:
        print(f"error: {e}", file=sys.stderr, flush=True)
    return EXIT_FAILED if errors else EXIT_OK


def _moderator(args: argparse.Namespace) -> Moderator:
    from ..moderator import Moderator

    return Moderator(encoder=encoder_spec(args))


def _cmd_create(args: argparse.Namespace) -> int:
    from ..banks import Bank

    dim, encoder_id = args.dim, args.encoder_id
    if args.kind == "pdq":
        if encoder_id or dim or args.model or args.pretrained:
            _say("error: --encoder-id, --dim, --model and --pretrained are for embedding banks")
            return EXIT_USAGE
    else:
        if args.dihedral:
            _say("error: --dihedral is for pdq banks")
            return EXIT_USAGE
        if (encoder_id is None) != (dim is None):
            _say("error: give --encoder-id with --dim (or --model/--pretrained to read both from the model)")
            return EXIT_USAGE
        if encoder_id is None:
            spec, _ = encoder_spec(args).resolve(None)
            encoder = spec.load()
            encoder_id, dim = encoder.encoder_id, encoder.dim
    bank = Bank.create(args.path, args.kind, dim=dim, encoder_id=encoder_id, dihedral=args.dihedral, name=args.name,
                       description=args.description)
    what = f"pdq{' (dihedral)' if bank.dihedral else ''}" if bank.kind == "pdq" else (
        f"embedding, {bank.encoder_id}, dim {bank.dim}")
    print(f"{bank.path}: created {bank.name!r} ({what})")
    bank.close()
    return EXIT_OK


def _cmd_add(args: argparse.Namespace) -> int:
    from ..banks import Bank, add_files, add_from_parquet

    if bool(args.files) == bool(args.from_parquet):
        _say("error: give image files/folders, or --from-parquet FILE (one of them)")
        return EXIT_USAGE
    if args.where_action and not args.from_parquet:
        _say("error: --where-action goes with --from-parquet")
        return EXIT_USAGE
    errors: list[str] = []
    with Bank.open(args.bank, writable=True) as bank:
        if args.from_parquet:
            ids = add_from_parquet(bank, args.from_parquet, where_action=args.where_action, label=args.label,
                                   cache_dir=args.cache, replace=args.replace, errors=errors)
        else:
            moderator = _moderator(args) if bank.kind == "embedding" else None
            ids = add_files(bank, args.files, label=args.label, entry_id=args.entry_id, moderator=moderator,
                            replace=args.replace, errors=errors)
        for i in ids:
            print(i)
        counts = bank.counts()
    _say(f"added {len(ids)} entr{'y' if len(ids) == 1 else 'ies'}"
         + (f", {len(errors)} not added" if errors else "") + f"; the bank holds {counts['entries']}")
    return _report(errors)


def _cmd_change(args: argparse.Namespace) -> int:
    from ..banks import Bank

    all_ = getattr(args, "all", False)
    if all_ == bool(args.ids):
        _say("error: give entry ids" + (", or --all for the whole bank (not both)" if args.change in (
            "disable", "enable") else ""))
        return EXIT_USAGE
    with Bank.open(args.bank, writable=True) as bank:
        if all_:
            bank.set_enabled(args.change == "enable")
            print(f"{bank.path}: bank {args.change}d")
            return EXIT_OK
        done = getattr(bank, args.change)(list(dict.fromkeys(args.ids)))
    for i in done:
        print(i)
    return EXIT_OK


def _cmd_list(args: argparse.Namespace) -> int:
    from ..banks import Bank, HitLog

    with Bank.open(args.bank) as bank:
        entries = list(bank.entries())
        hits = HitLog(bank.path)
        try:
            counts = hits.counts([e.id for e in entries], args.window_hours * 3600.0)
        finally:
            hits.close()
        summary = bank.counts()
        rows = []
        for e in entries:
            quarantined = e.confirmed is None and counts[e.id] > args.quarantine_max_inputs
            rows.append({**e.to_dict(), "flood_count": counts[e.id], "quarantined": quarantined})
        summary["quarantined"] = sum(r["quarantined"] for r in rows)
        if args.json:
            print(json.dumps({"bank": bank.name, "path": str(bank.path), "kind": bank.kind,
                              "encoder_id": bank.encoder_id, "dihedral": bank.dihedral, "enabled": bank.enabled,
                              "counts": summary, "entries": rows}))
            return EXIT_OK
        for r in rows:
            state = "enabled" if r["enabled"] else "disabled"
            mark = "\tQUARANTINED" if r["quarantined"] else ""
            print(f"{r['id']}\t{r['label']}\t{r['source']}\t{r['added']}\t{state}\t{r['flood_count']}{mark}")
        print(f"{bank.name}: {summary['entries']} entries ({summary['enabled']} enabled, {summary['disabled']} "
              f"disabled, {summary['quarantined']} quarantined: over {args.quarantine_max_inputs} inputs in "
              f"{args.window_hours:g} h), {summary['rows']} rows" + ("" if bank.enabled else "; the bank is disabled"))
    return EXIT_OK


def _cmd_match(args: argparse.Namespace) -> int:
    from ..banks import Bank

    with Bank.open(args.bank) as bank:
        if not bank.enabled:
            _say(f"{bank.path}: the bank is disabled: it matches nothing (`safeclip bank enable {args.bank} --all`)")
        results = _pdq_matches(bank, args) if bank.kind == "pdq" else _embedding_matches(bank, args)
    failed = 0
    for path, matches, error in results:
        if error is not None:
            failed += 1
            if args.json:
                print(json.dumps({"path": path, "error": error}), flush=True)
            else:
                print(f"error: {error}", file=sys.stderr, flush=True)
        elif args.json:
            print(json.dumps({"path": path, "matches": matches}), flush=True)
        elif not matches:
            print(f"{path}\t-", flush=True)
        else:
            for m in matches:
                value = m["distance"] if "distance" in m else f"{m['similarity']:.4f}"
                print(f"{path}\t{m['entry']}\t{m['label']}\t{value}", flush=True)
    return EXIT_FAILED if failed else EXIT_OK


_Result = tuple[str, list[dict[str, Any]], "str | None"]


def _best(bank: Bank, rows: Any, values: Any, *, lower: bool) -> list[tuple[str, str, float]]:
    """``(entry id, label, best value)`` per entry among matched rows, best first."""
    import numpy as np

    if not len(rows):
        return []
    nums = bank.entry_numbers(np.asarray(rows))
    best: dict[int, float] = {}
    for n, v in zip(nums.tolist(), np.asarray(values).tolist()):
        if n not in best or (v < best[n] if lower else v > best[n]):
            best[n] = v
    ents = bank.entries_by_number(list(best))
    out = [(ents[n].id, ents[n].label, v) for n, v in best.items() if n in ents]
    return sorted(out, key=lambda t: (t[2] if lower else -t[2], t[0]))


def _pdq_matches(bank: Bank, args: argparse.Namespace) -> list[_Result]:
    from ..banks import hash_file
    from ..errors import DecodeError

    out: list[_Result] = []
    for path in args.files:
        try:
            h = hash_file(path)
        except DecodeError as e:
            out.append((path, [], " ".join(str(e).split())))
            continue
        ok = h.usable()
        if not len(ok):
            out.append((path, [], h.too_flat().replace("it was not added", "it is not matched")))
            continue
        found = bank.search_hamming(h.codes[ok], args.max_distance) if bank.enabled else []
        rows = [r for rs, _ in found for r in rs.tolist()]
        dist = [d for _, ds in found for d in ds.tolist()]
        out.append((path, [{"entry": e, "label": lab, "distance": int(d)}
                           for e, lab, d in _best(bank, rows, dist, lower=True)], None))
    return out


def _embedding_matches(bank: Bank, args: argparse.Namespace) -> list[_Result]:
    import numpy as np

    from ..embed import prepare
    from ..errors import DecodeError, EncoderMismatchError

    moderator = _moderator(args)
    if moderator.encoder_id != bank.encoder_id:
        raise EncoderMismatchError(f"{bank.path} holds embeddings of {bank.encoder_id!r}, but the model given is "
                                   f"{moderator.encoder_id!r}: give the bank's model")
    out: list[_Result] = []
    for path in args.files:
        try:
            prep = prepare(path, moderator.encoder.pixel_spec, moderator.decoding)
        except DecodeError as e:
            out.append((path, [], " ".join(str(e).split())))
            continue
        emb = moderator.encoder.embed_pixels(prep.pixels)
        found = bank.search_vectors(emb, args.min_similarity) if bank.enabled else []
        rows = [r for rs, _ in found for r in rs.tolist()]
        sims = [s for _, ss in found for s in ss.tolist()]
        out.append((path, [{"entry": e, "label": lab, "similarity": round(float(s), 6)}
                           for e, lab, s in _best(bank, np.asarray(rows, np.int64), sims, lower=False)], None))
    return out


def _cmd_hash(args: argparse.Namespace) -> int:
    from ..banks import hash_file
    from ..errors import DecodeError
    from ..pdq import DIHEDRAL_NAMES

    failed = 0
    for path in args.files:
        try:
            h = hash_file(path, dihedral=args.dihedral)
        except DecodeError as e:
            failed += 1
            msg = " ".join(str(e).split())
            if args.json:
                print(json.dumps({"path": path, "error": msg}), flush=True)
            else:
                print(f"error: {msg}", file=sys.stderr, flush=True)
            continue
        first, quality = bytes(h.codes[0]).hex(), int(h.quality[0])
        if args.json:
            doc: dict[str, Any] = {"path": path, "pdq": first, "quality": quality}
            if args.dihedral:
                doc["variants"] = {n: bytes(c).hex() for n, c in zip(DIHEDRAL_NAMES, h.codes[:8])}
            print(json.dumps(doc), flush=True)
        else:
            print(f"{first}\t{quality}\t{path}", flush=True)
            if args.dihedral:
                for n, c in list(zip(DIHEDRAL_NAMES, h.codes[:8]))[1:]:
                    print(f"{bytes(c).hex()}\t{quality}\t{path}\t{n}", flush=True)
    return EXIT_FAILED if failed else EXIT_OK


def _cmd_import(args: argparse.Namespace) -> int:
    from ..banks import Bank, import_pdq_csv

    with Bank.open(args.bank, writable=True) as bank:
        n = import_pdq_csv(bank, args.csv, replace=args.replace)
        total = len(bank)
    print(f"{args.bank}: imported {n} entr{'y' if n == 1 else 'ies'} from {args.csv}; the bank holds {total}")
    return EXIT_OK


def _cmd_export(args: argparse.Namespace) -> int:
    from ..banks import Bank, write_pdq_csv

    with Bank.open(args.bank) as bank:
        n = write_pdq_csv(bank, args.csv)
    print(f"{args.csv}: wrote {n} entr{'y' if n == 1 else 'ies'} of {args.bank}")
    return EXIT_OK


def _cmd_index(args: argparse.Namespace) -> int:
    from ..banks import Bank

    t0 = time.monotonic()
    with Bank.open(args.bank, writable=True) as bank:
        bank.rebuild_index()
        rows = int(bank.active_rows().sum())
    print(f"{args.bank}: index rebuilt over {rows} rows in {time.monotonic() - t0:.1f} s")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    return run_standalone(register, "Banks of known content.", argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
