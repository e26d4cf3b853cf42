"""`sdonnx cache list` / `sdonnx cache prune`: the converted copies made on first use (sdonnx/cache.py)."""
import sys
import time

import click

from .cli import _fail

USER_ERRORS = (ValueError, OSError)

DATA_DIR = click.option("--data-dir", type=click.Path(file_okay=False), default=None,
                        help="The A1111 data folder whose models/ONNX cache to use [default: $SDONNX_DATA_DIR, else "
                             "the user cache folder, $SDONNX_CACHE_DIR].")


def _cache(data_dir):
    from .datadir import DataDir, model_cache

    return model_cache(DataDir.from_option(data_dir))


@click.group()
def cache():
    """The converted copies of checkpoints and VAEs made on first use."""


@cache.command("list")
@DATA_DIR
def list_entries(data_dir):
    """Each converted copy: kind, size, last use, source file (and whether it is still there)."""
    try:
        c = _cache(data_dir)
        entries = c.entries()
    except USER_ERRORS as e:
        _fail(e)
    click.echo(f"cache: {c.root}")
    total = 0
    for e in sorted(entries, key=lambda e: e.last_used, reverse=True):
        size = e.size
        total += size
        state = "" if e.source_present else "  (source missing or changed)"
        state += "" if e.current else "  (old converter version: not used)"
        click.echo(f"{e.kind:10} {_gb(size):>9}  used {_ago(e.last_used):>9}  {e.path.name}  <- {e.source}{state}")
    leftovers = c.leftovers()
    if leftovers:
        click.echo(f"{len(leftovers)} unfinished convert folder(s) left by killed converts (prune removes them)")
    click.echo(f"{len(entries)} entries, {_gb(total)}")


@cache.command()
@DATA_DIR
@click.option("--older-than", type=float, default=None, metavar="DAYS", help="Entries not used for DAYS days.")
@click.option("--missing-source", is_flag=True, help="Entries whose source file is gone or has changed since.")
@click.option("--stale", is_flag=True, help="Entries made by an older converter version (never used again).")
@click.option("--all", "everything", is_flag=True, help="Every entry.")
@click.option("--yes", is_flag=True, help="Remove them; without it, only show what would go.")
def prune(data_dir, older_than, missing_source, stale, everything, yes):
    """Remove converted copies (they are made again on next use), and what killed converts left behind."""
    from .cache import _Lock, remove_entry

    if not (older_than is not None or missing_source or stale or everything):
        _fail(ValueError("say what to prune: --older-than DAYS, --missing-source, --stale or --all"))
    try:
        c = _cache(data_dir)
        now = time.time()
        doomed = [e for e in c.entries() if everything or (stale and not e.current)
                  or (missing_source and not e.source_present)
                  or (older_than is not None and now - e.last_used > older_than * 86400)]
        leftovers = c.leftovers()
        freed = sum(e.size for e in doomed)
        for e in doomed:
            click.echo(f"{'removing' if yes else 'would remove'} {e.path.name} ({_gb(e.size)}) <- {e.source}")
            if yes:
                with _Lock(e.path.with_name(f".{e.path.name}.lock")):  # not while someone converts it
                    remove_entry(e.path)
        for path in leftovers:
            click.echo(f"{'removing' if yes else 'would remove'} {path.name} (an unfinished convert)")
            if yes:
                import shutil

                shutil.rmtree(path, ignore_errors=True)
    except USER_ERRORS as e:
        _fail(e)
    if not yes:
        click.echo(f"{len(doomed)} entries ({_gb(freed)}) would be removed; pass --yes to remove them", err=True)
        sys.exit(1 if doomed or leftovers else 0)
    click.echo(f"removed {len(doomed)} entries, {_gb(freed)}")


def _gb(size):
    return f"{size / 1e9:.2f} GB" if size >= 1e8 else f"{size / 1e6:.1f} MB"


def _ago(when):
    seconds = max(0.0, time.time() - when)
    for unit, length in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= length:
            return f"{seconds / length:.0f} {unit} ago"
    return "just now"
