"""Build lambda.zip: the app's files plus Linux wheels of requirements.txt.

Usage (normally through `make build` / scripts/build_lambda.sh):
    LAMBDA_PYTHON=3.11 LAMBDA_ARCH=x86_64 python scripts/build_lambda.py [--output PATH]

The dependencies are binary wheels for the Lambda platform, never for the build
machine, so a build on macOS or Windows gives the same Linux package. Every ELF
file in the package is then checked against the target CPU and the runtime's
glibc. The zip is reproducible: sorted entries, fixed timestamps and
permissions, bytecode with unchecked hashes (no mtimes).
"""

import argparse
import compileall
import os
import py_compile
import re
import shutil
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import lambda_elf

REPO = Path(__file__).resolve().parent.parent
# The service is every module at the top level (the layout is flat).
APP_MODULES = tuple(sorted(path.name for path in REPO.glob("*.py")))
# Folders of the app, each with the files of it the package takes:
# Alembic's environment and revisions (the migration function and SQLite's
# self-upgrade run them from the package), and the console's page, script
# and style (console.py serves them).
APP_TREES = {"migrations": "*.py", "console": "*"}
# The CA bundle the functions check the database's (or RDS Proxy's)
# certificate against, with Terraform's db_ssl_root_cert (DB_SSL_ROOT_CERT):
# fetched before the build, never committed, packaged when present.
CA_BUNDLE = "rds-ca-bundle.pem"
PEM_CERTIFICATE = "-----BEGIN CERTIFICATE-----"
WHEEL_ARCH = {"x86_64": "x86_64", "arm64": "aarch64"}
OLDEST_MANYLINUX_GLIBC = 17  # manylinux2014, the baseline of Linux wheels
MAX_ZIPPED = 50 * 2**20  # Lambda's limit for a direct upload
MAX_UNZIPPED = 250 * 2**20
ZIP_TIMESTAMP = (1980, 1, 1, 0, 0, 0)  # the earliest a zip entry can hold
TASK_ROOT = "/var/task"  # where Lambda unpacks the zip; named in tracebacks
# Swagger UI and ReDoc (fastapi-offline) stay in the package only while they
# cost at most this much zipped; without them /docs loads them from the CDN.
DOCS_ASSETS_PACKAGE = "fastapi_offline"
MAX_DOCS_ASSETS_ZIPPED = 2**20

# Never run in Lambda: test suites, type stubs, docs, C sources and headers,
# console scripts. Paths are relative to the package root.
PRUNE_DIRS = ("bin", "sqlalchemy/testing", "fastapi/.agents")
PRUNE_DIR_NAMES = ("tests", "test")
PRUNE_FILE_PATTERNS = (
    "test_*.py",
    "*.pyi",
    "py.typed",
    "*.c",
    "*.h",
    "*.pxd",
    "*.pyx",
    "sqlalchemy/dialects/*/provision.py",  # fixtures for sqlalchemy.testing
    "anyio/pytest_plugin.py",
)


def runtime_glibc(python_version: str) -> int:
    """glibc minor version of the Lambda runtime's OS.

    python3.8-3.11 run on Amazon Linux 2 (glibc 2.26), python3.12+ on
    Amazon Linux 2023 (glibc 2.34).
    """
    minor = int(python_version.split(".")[1])
    return 26 if minor <= 11 else 34


# psycopg2-binary's aarch64 wheels are manylinux_2_27/2_28 only.
PSYCOPG2_AARCH64_GLIBC = 28


def wheel_glibc(python_version: str, wheel_arch: str) -> int:
    """The newest glibc the package's wheels may need.

    The runtime's, except for aarch64 on Amazon Linux 2 (python3.11 and
    older): no psycopg2-binary wheel fits there, so the build takes the
    manylinux_2_28 ones as asked and says loudly that PostgreSQL will not
    load on that runtime (Terraform refuses to deploy the pair).
    """
    glibc = runtime_glibc(python_version)
    if wheel_arch == "aarch64" and glibc < PSYCOPG2_AARCH64_GLIBC:
        banner = "!" * 78
        print(
            f"{banner}\nWARNING: python{python_version} on arm64 runs on Amazon Linux 2 "
            f"(glibc 2.{glibc}), but psycopg2-binary's\naarch64 wheels need glibc 2.27+: "
            "this package imports, yet PostgreSQL fails on Lambda\nat the first query. "
            "Deploy arm64 with LAMBDA_PYTHON=3.12 or newer.\n"
            f"{banner}",
            file=sys.stderr,
        )
        return PSYCOPG2_AARCH64_GLIBC
    return glibc


def platform_tags(wheel_arch: str, glibc: int) -> list[str]:
    """Every manylinux tag the runtime accepts, newest first.

    Listed explicitly: with manylinux2014 alone pip never considers wheels such
    as psycopg2-binary's aarch64 ones (manylinux_2_27/2_28 only).
    """
    tags = [f"manylinux_2_{minor}_{wheel_arch}" for minor in range(glibc, 16, -1)]
    return tags + [f"manylinux2014_{wheel_arch}"]


def install_dependencies(
    target: Path, python_version: str, wheel_arch: str, glibc: int
) -> None:
    platforms = platform_tags(wheel_arch, glibc)
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-compile"]
    command += ["--disable-pip-version-check", "--only-binary=:all:"]
    command += ["--implementation", "cp", "--python-version", python_version]
    for platform in platforms:
        command += ["--platform", platform]
    command += ["--target", str(target), "-r", str(REPO / "requirements.txt")]
    result = subprocess.run(command, check=False, capture_output=True, text=True)
    if result.returncode != 0:
        sys.stderr.write(result.stdout + result.stderr)
        fail(
            f"no wheels of requirements.txt fit python{python_version} on "
            f"{wheel_arch} with glibc <= 2.{glibc}"
        )


def prune(root: Path) -> int:
    """Delete what never runs in Lambda from the dependencies; return bytes saved."""
    doomed = [root / relative for relative in PRUNE_DIRS]
    doomed += [path for name in PRUNE_DIR_NAMES for path in root.rglob(name)]
    doomed += [path for pattern in PRUNE_FILE_PATTERNS for path in root.rglob(pattern)]
    doomed += [path for path in root.rglob("*.md") if ".dist-info" not in str(path)]
    saved = 0
    for path in doomed:
        if path.is_dir():
            saved += tree_size(path)
            shutil.rmtree(path)
        elif path.is_file():
            saved += path.stat().st_size
            path.unlink()
    return saved


def docs_assets(root: Path) -> str:
    """Keep the docs assets if they cost at most MAX_DOCS_ASSETS_ZIPPED; say which."""
    package = root / DOCS_ASSETS_PACKAGE
    if not package.is_dir():
        return "docs assets: not installed, /docs uses the CDN"
    zipped = sum(
        len(zlib.compress(path.read_bytes(), zlib.Z_DEFAULT_COMPRESSION))
        for path in package.rglob("*")
        if path.is_file()
    )
    if zipped <= MAX_DOCS_ASSETS_ZIPPED:
        return f"docs assets: {mib(zipped)} zipped, kept (limit {mib(MAX_DOCS_ASSETS_ZIPPED)})"
    shutil.rmtree(package)
    for info in root.glob(f"{DOCS_ASSETS_PACKAGE}-*.dist-info"):
        shutil.rmtree(info)
    return (
        f"docs assets: {mib(zipped)} zipped, left out (limit "
        f"{mib(MAX_DOCS_ASSETS_ZIPPED)}): /docs uses the CDN"
    )


def copy_app_modules(root: Path) -> None:
    for name in APP_MODULES:
        shutil.copyfile(REPO / name, root / name)
    for tree, pattern in APP_TREES.items():
        for source in sorted((REPO / tree).rglob(pattern)):
            if not source.is_file():
                continue
            target = root / source.relative_to(REPO)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)


def copy_ca_bundle(source: Path, root: Path) -> str:
    """Package `source`/CA_BUNDLE when it was fetched; say what was done."""
    bundle = source / CA_BUNDLE
    if not bundle.is_file():
        return f"CA bundle: none ({CA_BUNDLE} not fetched; sslmode from the URL)"
    certificates = bundle.read_text(errors="replace").count(PEM_CERTIFICATE)
    if not certificates:
        fail(f"{bundle} holds no PEM certificate; fetch it again")
    shutil.copyfile(bundle, root / CA_BUNDLE)
    return f"CA bundle: {CA_BUNDLE} ({certificates} certificates)"


def compile_bytecode(root: Path) -> None:
    """Ship .pyc so cold starts skip compiling (the task root is read-only).

    Unchecked-hash .pyc hold no timestamps (reproducible) and are trusted without
    reading the source; file names point to /var/task as on Lambda.
    """
    compiled = compileall.compile_dir(
        root,
        ddir=TASK_ROOT,
        quiet=1,
        workers=0,
        optimize=0,
        invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH,
    )
    if not compiled:
        fail("compileall failed on a module of the package")


def warn_no_bytecode(python_version: str) -> None:
    running = f"{sys.version_info[0]}.{sys.version_info[1]}"
    banner = "!" * 78
    print(
        f"{banner}\nWARNING: NO BYTECODE IN THE PACKAGE. The build runs on Python "
        f"{running}, the target is {python_version};\nbytecode only fits the "
        "interpreter version that wrote it, so every cold start will compile all "
        "modules\nfrom source (seconds, not a fraction). Build with Python "
        f"{python_version}: BUILD_PYTHON=python{python_version} make build\n{banner}",
        file=sys.stderr,
    )


def verify_binaries(
    root: Path, python_version: str, wheel_arch: str, glibc: int
) -> int:
    """Fail unless every ELF file fits the target CPU, glibc and Python."""
    abi = "cpython-" + python_version.replace(".", "")
    problems, count = [], 0
    for path in sorted(root.rglob("*")):
        if not path.is_file() or not lambda_elf.is_elf(path):
            continue
        count += 1
        data = path.read_bytes()
        relative = path.relative_to(root)
        cpu = lambda_elf.machine(data)
        if cpu != wheel_arch:
            problems.append(f"{relative}: built for {cpu}, not {wheel_arch}")
            continue
        needed = lambda_elf.required_glibc(data)
        if needed > (2, glibc):
            problems.append(
                f"{relative}: needs glibc {needed[0]}.{needed[1]} > 2.{glibc}"
            )
        tag = re.search(r"\.(cpython-\d+)-", path.name)
        if tag and tag[1] != abi:
            problems.append(f"{relative}: built for {tag[1]}, not {abi}")
    if problems:
        fail("binaries that cannot load on the target:\n  " + "\n  ".join(problems))
    return count


def write_zip(root: Path, output: Path) -> int:
    """Zip `root` reproducibly; return the unzipped size in bytes."""
    files = sorted(
        (path for path in root.rglob("*") if path.is_file()),
        key=lambda path: path.relative_to(root).as_posix(),
    )
    partial = output.with_name(output.name + ".partial")
    unzipped = 0
    with zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED) as zip_:
        for path in files:
            if path.is_symlink():
                fail(f"symlink in the package: {path}")
            entry = zipfile.ZipInfo(path.relative_to(root).as_posix(), ZIP_TIMESTAMP)
            entry.create_system = 3  # Unix, whatever the build machine
            entry.external_attr = 0o100644 << 16  # regular file, rw-r--r--
            entry.compress_type = zipfile.ZIP_DEFLATED
            data = path.read_bytes()
            unzipped += len(data)
            zip_.writestr(entry, data)
    os.replace(partial, output)
    return unzipped


def tree_size(path: Path) -> int:
    return sum(item.stat().st_size for item in path.rglob("*") if item.is_file())


def mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


def fail(message: str) -> None:
    print(f"build_lambda: error: {message}", file=sys.stderr)
    sys.exit(1)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=REPO / "lambda.zip")
    parser.add_argument(
        "--work-dir", type=Path, help="staging folder (default build/lambda-VER-ARCH)"
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    python_version = os.environ.get("LAMBDA_PYTHON") or "3.11"
    arch = os.environ.get("LAMBDA_ARCH") or "x86_64"
    if not re.fullmatch(r"3\.\d+", python_version):
        fail(f"LAMBDA_PYTHON must look like 3.11, got {python_version!r}")
    if arch not in WHEEL_ARCH:
        fail(f"LAMBDA_ARCH must be one of {', '.join(WHEEL_ARCH)}, got {arch!r}")
    wheel_arch = WHEEL_ARCH[arch]
    work_dir = args.work_dir or REPO / "build" / f"lambda-{python_version}-{arch}"
    root = work_dir / "package"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)

    print(f"build_lambda: python{python_version} {arch}: installing requirements.txt")
    glibc = wheel_glibc(python_version, wheel_arch)
    install_dependencies(root, python_version, wheel_arch, glibc)
    saved = prune(root)
    docs = docs_assets(root)
    copy_app_modules(root)
    bundle = copy_ca_bundle(REPO, root)
    binaries = verify_binaries(root, python_version, wheel_arch, glibc)
    with_bytecode = python_version == f"{sys.version_info[0]}.{sys.version_info[1]}"
    if with_bytecode:
        compile_bytecode(root)
    else:
        warn_no_bytecode(python_version)
    output = args.output.resolve()
    unzipped = write_zip(root, output)
    zipped = output.stat().st_size
    print(
        f"build_lambda: wrote {output}: {mib(zipped)} zipped, {mib(unzipped)} "
        f"unzipped (limits 50 / 250 MiB); {binaries} ELF files checked for "
        f"{wheel_arch} and glibc <= 2.{glibc}; "
        f"bytecode: {'yes' if with_bytecode else 'NO'}; pruned {mib(saved)} "
        f"(tests, stubs, docs, C sources, scripts); {docs}; {bundle}"
    )
    if zipped > MAX_ZIPPED or unzipped > MAX_UNZIPPED:
        output.unlink()
        fail("the package exceeds Lambda's size limits; removed it")


if __name__ == "__main__":
    main()
