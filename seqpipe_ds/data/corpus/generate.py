"""Regenerates stdlib_docstrings.txt, the embedded default corpus (see README.md here).

Run once by a maintainer, never at training time: docstrings change between Python versions and
the corpus must stay byte-identical for runs to be comparable. Writes next to this file.
"""
import importlib
import inspect
import os
import shutil
import sys
import sysconfig

# Pure-Python standard-library modules with long, prose-like docstrings. Modules that the Python
# license lists as incorporating third-party code under other terms (asynchat, asyncore,
# http.cookies, trace, uu, xmlrpc, decimal, random, socket, select, ssl, zlib, asyncio) are left
# out so that everything here is covered by the PSF license alone.
MODULES = [
    "abc", "argparse", "ast", "base64", "bz2", "calendar", "cmd", "code", "codecs", "collections",
    "colorsys", "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "difflib",
    "dis", "doctest", "email.utils", "enum", "filecmp", "fileinput", "fnmatch", "fractions",
    "functools", "getopt", "gettext", "glob", "graphlib", "gzip", "heapq", "hmac", "html",
    "html.parser", "http.client", "importlib", "inspect", "io", "ipaddress", "json", "linecache",
    "locale", "logging", "lzma", "mimetypes", "multiprocessing.pool", "numbers", "operator",
    "optparse", "os", "pathlib", "pickle", "platform", "plistlib", "posixpath", "pprint", "pydoc",
    "queue", "quopri", "runpy", "sched", "secrets", "selectors", "shelve", "shlex", "shutil",
    "statistics", "string", "struct", "subprocess", "sysconfig", "tempfile",
    "textwrap", "threading", "timeit", "tokenize", "traceback", "tracemalloc", "types", "typing",
    "unittest.case", "urllib.parse", "urllib.request", "uuid", "warnings", "weakref", "webbrowser",
    "xml.dom.minidom", "xml.etree.ElementTree", "zipapp", "zipfile",
]

SEPARATOR = "<|endoftext|>"
HERE = os.path.dirname(os.path.abspath(__file__))


def _doc(obj):
    # __doc__ rather than inspect.getdoc: getdoc inherits a base class's docstring, which would
    # repeat the same text under every override.
    doc = getattr(obj, "__doc__", None)
    return inspect.cleandoc(doc) if isinstance(doc, str) and doc.strip() else None


def _defined_in(obj, module):
    return getattr(obj, "__module__", None) == module.__name__ and _doc(obj)


def _entries(module):
    """Yields (heading, docstring) for the module and the public classes, functions and methods it defines."""
    yield f"Module {module.__name__}", _doc(module)
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue
        if not _defined_in(obj, module):
            continue
        yield f"{module.__name__}.{name}", _doc(obj)
        if inspect.isclass(obj):
            for attr, member in sorted(vars(obj).items()):
                if attr.startswith("_") or not inspect.isfunction(member):
                    continue
                if _defined_in(member, module):
                    yield f"{module.__name__}.{name}.{attr}", _doc(member)


def document(module_name):
    module = importlib.import_module(module_name)
    parts = [f"{heading}\n\n{doc.strip()}" for heading, doc in _entries(module) if doc]
    return "\n\n".join(parts)


def main():
    if sys.flags.optimize >= 2:
        sys.exit("run without -OO: it strips the docstrings this corpus is made of")
    documents = [document(name) for name in MODULES]
    empty = [name for name, text in zip(MODULES, documents) if not text]
    if empty:
        sys.exit(f"no docstrings found in {empty}: drop them from MODULES")
    with open(os.path.join(HERE, "stdlib_docstrings.txt"), "w", encoding="utf-8") as f:
        f.write(f"\n{SEPARATOR}\n".join(documents) + "\n")
    shutil.copyfile(os.path.join(sysconfig.get_paths()["stdlib"], "LICENSE.txt"),
                    os.path.join(HERE, "LICENSE-PSF.txt"))
    print(f"{len(documents)} documents from Python {sys.version.split()[0]}")


if __name__ == "__main__":
    main()
