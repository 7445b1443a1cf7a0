"""Build the fastloss extension modules.

Every ``fastloss/_kernels/*.pyx`` file becomes one extension module, after
any ``*.pyx.tp`` Tempita template beside it has been rendered to ``.pyx``.

On x86-64 the hot kernel modules (``DISPATCHED`` in
``fastloss/_kernels/__init__.py``) are built twice more, from copies named
``<name>_avx2.pyx`` and ``<name>_avx512.pyx``, with AVX2 and AVX-512 code
generation. The package picks one build at import from the CPU's features, so
a wheel keeps running on any x86-64 CPU and still uses the wide vectors where
they exist.

Environment variables:

FASTLOSS_DEBUG=1
    Turn bounds checks, wraparound and ``initializedcheck`` back on and build
    with ``-O0 -g``, for chasing an out-of-bounds read.
FASTLOSS_NO_OPENMP=1
    Build without OpenMP even where the compiler supports it. The kernels then
    run single-threaded and ``fastloss.openmp_enabled()`` returns False.
FASTLOSS_NO_DISPATCH=1
    Build only the baseline kernels, with no AVX2 or AVX-512 copies.
"""

import os
import platform
import shutil
import subprocess
import sys
import tempfile
import textwrap
import warnings
from pathlib import Path

import numpy as np
from Cython.Build import cythonize
from Cython.Tempita import Template
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent
KERNELS = HERE / "fastloss" / "_kernels"
DEBUG = os.environ.get("FASTLOSS_DEBUG", "0") not in ("", "0")
NO_OPENMP = os.environ.get("FASTLOSS_NO_OPENMP", "0") not in ("", "0")
NO_DISPATCH = os.environ.get("FASTLOSS_NO_DISPATCH", "0") not in ("", "0")

# Kept equal to DISPATCHED in fastloss/_kernels/__init__.py, which the build
# cannot import before the package is compiled.
DISPATCHED = ("_overlap", "_regression", "_sigmoid", "_softmax", "_stats")

# Code-generation flags of each SIMD build, per compiler family. The levels
# match fl_simd_level() in cpu_features.h: the import picks a build only when
# the CPU has every instruction set named here. -mfma only permits FMA
# instructions; -ffp-contract=off still keeps a*b+c unfused, so every build
# rounds each operation as the baseline does.
SIMD_FLAGS = {
    "avx2": {
        "unix": ["-mavx2", "-mfma", "-mf16c"],
        "msvc": ["/arch:AVX2"],
    },
    "avx512": {
        "unix": ["-mavx512f", "-mavx512cd", "-mavx512bw", "-mavx512dq",
                 "-mavx512vl", "-mavx2", "-mfma", "-mf16c",
                 "-mprefer-vector-width=512"],
        "msvc": ["/arch:AVX512"],
    },
}

# Appended to each copy, so that a test can check that the copy was really
# compiled with its level's flags.
COMPILED_LEVEL = textwrap.dedent(
    """

    cdef extern from "cpu_features.h":
        int fl_compiled_level()


    def compiled_simd_level():
        \"\"\"Return the SIMD level that this module was compiled for.\"\"\"
        return fl_compiled_level()
    """
)

SIMD_PROBE = textwrap.dedent(
    """\
    float scale(float *x, int n) {
        float s = 0.0f;
        for (int i = 0; i < n; i++) { x[i] *= 2.0f; s += x[i]; }
        return s;
    }
    """
)

OPENMP_PROBE = textwrap.dedent(
    """\
    #include <omp.h>
    #include <stdio.h>
    int main(void) {
        int n = 0;
        #pragma omp parallel reduction(+:n)
        n += 1;
        printf("%d\\n", n);
        return n > 0 ? 0 : 1;
    }
    """
)


def render_templates():
    """Render each ``*.pyx.tp`` template to the ``.pyx`` beside it."""
    for template_path in sorted(KERNELS.glob("*.pyx.tp")):
        target = template_path.with_suffix("")
        text = Template(template_path.read_text(), name=str(template_path)).substitute()
        if not target.exists() or target.read_text() != text:
            target.write_text(text)


def openmp_flags(compiler):
    """Return ``(compile_args, link_args)`` for OpenMP, or ``None``.

    The flags are chosen per compiler and confirmed by compiling, linking and
    running a small OpenMP program, so a compiler that accepts ``-fopenmp`` but
    has no runtime library does not produce a module that fails to import.
    """
    if compiler.compiler_type == "msvc":
        candidates = [(["/openmp"], [])]
    elif sys.platform == "darwin":
        # Apple clang needs the libomp runtime from Homebrew or conda.
        prefixes = [os.environ.get("OPENMP_PREFIX", ""), "/opt/homebrew/opt/libomp",
                    "/usr/local/opt/libomp"]
        candidates = [(["-fopenmp"], ["-fopenmp"])]
        for prefix in filter(None, prefixes):
            candidates.append(
                ([f"-Xpreprocessor", "-fopenmp", f"-I{prefix}/include"],
                 [f"-L{prefix}/lib", "-lomp", f"-Wl,-rpath,{prefix}/lib"])
            )
    else:
        candidates = [(["-fopenmp"], ["-fopenmp"])]

    for compile_args, link_args in candidates:
        if probe_openmp(compiler, compile_args, link_args):
            return compile_args, link_args
    return None


def probe_openmp(compiler, compile_args, link_args):
    """Compile, link and run the OpenMP probe with the given flags."""
    tmpdir = tempfile.mkdtemp(prefix="fastloss-omp-")
    source = os.path.join(tmpdir, "probe.c")
    with open(source, "w") as f:
        f.write(OPENMP_PROBE)
    try:
        objects = compiler.compile([source], output_dir=tmpdir, extra_postargs=compile_args)
        exe = os.path.join(tmpdir, "probe")
        compiler.link_executable(objects, exe, extra_postargs=link_args)
        if compiler.compiler_type == "msvc":
            exe += ".exe"
        subprocess.run([exe], check=True, capture_output=True, timeout=60)
    except Exception:
        return False
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return True


def targets_x86_64():
    """Return True when the modules are compiled for x86-64 alone.

    A macOS universal2 build also compiles for arm64, where the x86 flags
    do not exist, so it gets the baseline kernels only.
    """
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    archflags = os.environ.get("ARCHFLAGS", "")
    return "arm64" not in archflags


def compiler_accepts(compiler, flags):
    """Return True if the compiler builds a small C file with ``flags``."""
    tmpdir = tempfile.mkdtemp(prefix="fastloss-simd-")
    source = os.path.join(tmpdir, "probe.c")
    with open(source, "w") as f:
        f.write(SIMD_PROBE)
    try:
        compiler.compile([source], output_dir=tmpdir, extra_postargs=flags)
    except Exception:
        return False
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return True


class BuildExt(build_ext):
    """Add optimisation and OpenMP flags that suit the compiler in use."""

    def build_extensions(self):
        compiler = self.compiler
        if compiler.compiler_type == "msvc":
            opt_args = ["/O2"]
        elif DEBUG:
            # No FMA contraction here either, so that a debug build computes
            # the same bits as a release build.
            opt_args = ["-O0", "-g", "-ffp-contract=off"]
        else:
            # -O3 for the vectorizer; no -march, so wheels run on any CPU of
            # their architecture. -fno-math-errno lets exp and log inline.
            # -fno-trapping-math lets gcc if-convert floating-point selects
            # (x > c ? c : x), so that loops containing them vectorize. It
            # changes no result, because no kernel reads or traps on
            # floating-point exception flags (clang assumes this by default).
            # -ffp-contract=off keeps a*b+c from fusing into an FMA in some
            # loops and not others, which on FMA targets (aarch64) would make
            # the kernels' layouts differ in the last bit.
            opt_args = ["-O3", "-fno-math-errno", "-fno-trapping-math",
                        "-ffp-contract=off"]

        omp = None if NO_OPENMP else openmp_flags(compiler)
        if omp is None and not NO_OPENMP:
            warnings.warn(
                "OpenMP was not found for this compiler: fastloss is being "
                "built single-threaded, and fastloss.openmp_enabled() will "
                "return False.",
                stacklevel=1,
            )
        family = "msvc" if compiler.compiler_type == "msvc" else "unix"
        accepted = {}
        selected = []
        for ext in self.extensions:
            level = getattr(ext, "simd_level", None)
            simd_args = []
            if level is not None:
                simd_args = SIMD_FLAGS[level][family]
                if level not in accepted:
                    accepted[level] = compiler_accepts(compiler, simd_args)
                    if not accepted[level]:
                        warnings.warn(
                            f"The compiler rejects the {level} flags "
                            f"{' '.join(simd_args)}: fastloss is being built "
                            f"without its {level} kernels.",
                            stacklevel=1,
                        )
                if not accepted[level]:
                    continue
            ext.extra_compile_args = list(opt_args) + simd_args
            ext.extra_link_args = []
            if omp is not None:
                ext.extra_compile_args += omp[0]
                ext.extra_link_args += omp[1]
            selected.append(ext)
        self.extensions = selected
        super().build_extensions()


def simd_copies():
    """Write ``<name>_<level>.pyx`` copies of the dispatched modules.

    Return the list of ``(level, path)``. A copy is rewritten only when its
    text changes, so an unchanged kernel is not recompiled. Copies of levels
    that this build does not make are removed.
    """
    copies = []
    make_copies = targets_x86_64() and not NO_DISPATCH
    for level in SIMD_FLAGS:
        for name in DISPATCHED:
            target = KERNELS / f"{name}_{level}.pyx"
            if not make_copies:
                # Modules left by an earlier in-place build would still be
                # imported, and run old code.
                for stale in [target, target.with_suffix(".c"),
                              *KERNELS.glob(f"{name}_{level}.*.so"),
                              *KERNELS.glob(f"{name}_{level}.*.pyd")]:
                    stale.unlink(missing_ok=True)
                continue
            text = (
                f"# Generated by setup.py from {name}.pyx for the {level} "
                f"build; edit {name}.pyx.\n" + (KERNELS / f"{name}.pyx").read_text()
                + COMPILED_LEVEL
            )
            if not target.exists() or target.read_text() != text:
                target.write_text(text)
            copies.append((level, target))
    return copies


def extension(source, copies_made=False):
    macros = [("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")]
    if source.stem == "_openmp":
        # Tells the tests whether this build was meant to have SIMD copies,
        # so that a copy the compiler rejected does not go unnoticed.
        macros.append(("FASTLOSS_SIMD_COPIES", "1" if copies_made else "0"))
    return Extension(
        f"fastloss._kernels.{source.stem}",
        [str(source.relative_to(HERE))],
        include_dirs=[np.get_include()],
        define_macros=macros,
    )


def extensions():
    render_templates()
    copies = simd_copies()
    copy_paths = {path for _, path in copies}
    modules = [extension(source, bool(copies))
               for source in sorted(KERNELS.glob("*.pyx"))
               if source not in copy_paths
               and not source.stem.endswith(tuple(f"_{level}" for level in SIMD_FLAGS))]
    levels = {}
    for level, path in copies:
        module = extension(path)
        levels[module.name] = level
        modules.append(module)
    directives = {
        "language_level": 3,
        "boundscheck": DEBUG,
        "wraparound": DEBUG,
        "initializedcheck": DEBUG,
        "cdivision": True,
        "nonecheck": False,
        "embedsignature": True,
        "cpow": True,
    }
    modules = cythonize(modules, compiler_directives=directives,
                        compile_time_env={"DEBUG": DEBUG})
    # cythonize returns new Extension objects, so the level is set on them.
    for module in modules:
        module.simd_level = levels.get(module.name)
    return modules


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExt})
