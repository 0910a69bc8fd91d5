"""Command line of the conversion tool (also the console script ``llama-jax-convert``).

Import::

    python -m conversions --source=meta --input=Meta-Llama-3.1-8B/ --output=ckpt/ [--dtype=bfloat16] [--overwrite]
    python -m conversions --source=hf   --input=hf_folder/ --output=ckpt/
    python -m conversions --source=gguf --input=model.gguf --output=ckpt/

Export::

    python -m conversions --source=orbax --target=hf   --input=ckpt/ --output=hf_folder/
    python -m conversions --source=orbax --target=meta --input=ckpt/ --output=meta_folder/

On bad input the tool prints ``error: <file>: <reason>`` to stderr and exits with status 1, leaving nothing at
``--output``.
"""

from __future__ import annotations

import sys

from absl import app, flags


def define_flags(fv: flags.FlagValues = flags.FLAGS) -> flags.FlagValues:
    """Defines the tool's flags on ``fv``. Done by :func:`run`, not at import, so that importing this module (for
    :func:`convert_from_flags`) never clashes with other programs' flags (e.g. ``--dtype``) in one process."""
    flags.DEFINE_enum("source", None, ["meta", "hf", "gguf", "orbax"], "Input format.", flag_values=fv)
    flags.DEFINE_enum("target", None, ["hf", "meta"], "Export format (only with --source=orbax).", flag_values=fv)
    flags.DEFINE_string("input", None, "Input directory (meta, hf, orbax) or .gguf file.", flag_values=fv)
    flags.DEFINE_string("output", None, "Output directory (must not exist unless --overwrite).", flag_values=fv)
    flags.DEFINE_enum(
        "dtype",
        None,
        ["float32", "bfloat16", "float16"],
        "Stored parameter dtype (default: the source's dtype; quantized GGUF -> float32).",
        flag_values=fv,
    )
    flags.DEFINE_bool("overwrite", False, "Replace an existing --output.", flag_values=fv)
    flags.DEFINE_bool("progress", True, "Show a tqdm progress bar (bytes).", flag_values=fv)
    return fv


def convert_from_flags(
    source: str,
    input: str,
    output: str,
    target: str | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> str:
    """The whole tool as a function (what the CLI runs). Returns the output path.

    Raises ValueError (incl. conversions.common.ConversionError), FileNotFoundError, FileExistsError, naming the
    flag or file.
    """
    from conversions import common

    if not input:
        raise ValueError("--input is required")
    if not output:
        raise ValueError("--output is required")
    common.check_no_overlap(input, output)
    np_dtype = common.numpy_dtype(dtype)
    if source == "orbax":
        from conversions import export

        if target is None:
            raise ValueError("--target (hf or meta) is required with --source=orbax")
        fn = export.export_hf if target == "hf" else export.export_meta
        return fn(input, output, dtype=np_dtype, overwrite=overwrite, progress=progress)
    if target is not None:
        raise ValueError(f"--target is only valid with --source=orbax (got --source={source})")
    import os

    if os.path.lexists(output) and not overwrite:
        raise FileExistsError(f"{output}: output already exists (pass --overwrite to replace it)")
    if source == "meta":
        from conversions.meta import MetaSource as cls
    elif source == "hf":
        from conversions.hf import HFSource as cls
    elif source == "gguf":
        from conversions.gguf import GGUFSource as cls
    else:
        raise ValueError(f"--source: unknown value {source!r}")
    src = cls(input)
    try:
        return common.convert(src, output, dtype=np_dtype, overwrite=overwrite, progress=progress)
    finally:
        src.close()


def main(argv, fv: flags.FlagValues = flags.FLAGS):
    """Runs the tool with parsed flags ``fv``; exits with status 1 (message on stderr) on bad input."""
    from llama_jax.logs import quiet_unless_verbose

    quiet_unless_verbose()
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if fv.source is None:
        raise app.UsageError("--source is required")
    try:
        out = convert_from_flags(fv.source, fv.input, fv.output, fv.target, fv.dtype, fv.overwrite, fv.progress)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(out)


def run():
    """Console-script entry point ``llama-jax-convert`` (``--help`` prints this module's help, as ``python -m``)."""
    from llama_jax.logs import adopt_main_help

    define_flags()
    adopt_main_help(__doc__, __name__)
    app.run(main)


if __name__ == "__main__":
    run()
