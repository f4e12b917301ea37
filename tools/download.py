r"""Prefetches published checkpoints into the cache, for machines without internet.

    python tools/download.py augreg_B/16_i21k timm/vit_base_patch16_224.augreg2_in21k_ft_in1k
    python tools/download.py --list              # the registry: names, what they are, top-1
    python tools/download.py --list --markdown   # the same as README's Markdown table
    python tools/download.py --list --markdown --details   # docs/checkpoints.md's, with sources

Each checkpoint's local path (a file, or the folder of a timm Hub checkpoint) is printed, one
per line. The cache is $KERAS_VIT_HOME/weights (default ~/.cache/keras_vit/weights): copy it to
a machine without internet and set KERAS_VIT_OFFLINE=1 there. KERAS_VIT_MIRROR=URL downloads
from a mirror instead (docs/checkpoints.md).
"""

from absl import app, flags

import keras_vit_tools  # noqa: F401  (first: the TF backend, a quiet TF start-up)
from keras_vit import cli, pretrained

_LIST = flags.DEFINE_bool("list", False, "Print the registry of published checkpoints and exit.")
_MARKDOWN = flags.DEFINE_bool("markdown", False, "With --list: a Markdown table (README's).")
_DETAILS = flags.DEFINE_bool(
    "details", False, "With --list --markdown: each entry's description and the source of its "
    "top-1 (docs/checkpoints.md's table).")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar per download on stderr.")


def _top1(found):
    return "-" if found["imagenet_top1"] is None else f"{found['imagenet_top1']:g}"


def _source(found):
    hosts = {spec["url"].split("/")[2] for spec in found["files"].values()}
    return ", ".join(sorted(hosts))


def _print_table(markdown, details):
    rows = []
    for name in pretrained.names():
        found = pretrained.entry(name)
        what = found["description"]
        if "alias_of" in found:
            what = f"same files as {found['alias_of']}"
        architecture = found["architecture"]
        rows.append((name, found["format"],
                     f"{architecture['variant']} @{architecture['image_size']}",
                     _top1(found), what, found["top1_source"], _source(found)))
    if markdown and details:
        print("| name | what it is | files from | ImageNet top-1 (%) | top-1 source |")
        print("| --- | --- | --- | ---: | --- |")
        for name, fmt, arch, top1, what, top1_source, source in rows:
            print(f"| `{name}` | {what} ({fmt}, {arch}) | {source} | {top1} | {top1_source} |")
    elif markdown:
        print("| name | format | model | files from | ImageNet top-1 (%) |")
        print("| --- | --- | --- | --- | ---: |")
        for name, fmt, arch, top1, _, _, source in rows:
            print(f"| `{name}` | {fmt} | {arch} | {source} | {top1} |")
    else:
        width = max(len(row[0]) for row in rows)
        print(f"{'name':<{width}}  {'format':<10}  {'model':<11}  {'top-1':>6}")
        for name, fmt, arch, top1, *_ in rows:
            print(f"{name:<{width}}  {fmt:<10}  {arch:<11}  {top1:>6}")


def main(argv):
    names = argv[1:]
    if _LIST.value:
        if names:
            raise app.UsageError("--list takes no names: download.py --list")
        _print_table(_MARKDOWN.value, _DETAILS.value)
        return
    if not names:
        raise app.UsageError("Give one or more checkpoint names (download.py --list lists "
                             "them): download.py NAME...")
    for name in names:  # every name is checked before the first (long) download
        pretrained.entry(name)
    for name in names:
        print(pretrained.resolve(name, progress=_PROGRESS.value), flush=True)


def run():
    """Console script `keras-vit-download`."""
    cli.run(main)


if __name__ == "__main__":
    run()
