#!/usr/bin/env python3
"""Write the small but real ZIM file baked into the stand-in scraper images.

Usage: make_zim.py OUTPUT.zim

Two HTML articles (one of them the main page), a stylesheet, the metadata
that openZIM's metadata spec asks for (Name, Title, Language, Creator,
Publisher, Date, Description, a 48x48 PNG illustration) and libzim's MD5
checksum. No full-text index: it is not needed and makes the file larger.
The file is re-opened and checked (libzim's integrity checks, checksum
included) before this script reports success.

Needs only the standard library and the libzim package from PyPI
(tests/py/requirements.txt).
"""

import datetime
import os
import struct
import sys
import zlib

from libzim.reader import Archive
from libzim.writer import Creator, Hint, Item, StringProvider

CSS = "body { font-family: sans-serif; margin: 2em; } h1 { color: #0a5; }\n"

PAGES = {
    # path: (title, body)
    "index": (
        "Zimfarm worker test ZIM",
        "<h1>Zimfarm worker test ZIM</h1>"
        "<p>A tiny ZIM file made by the zimfarm-worker test suite, copied by "
        "the stand-in scrapers to their output directory.</p>"
        '<p>See also <a href="second">the second page</a>.</p>',
    ),
    "second": (
        "Second page",
        "<h1>Second page</h1>"
        "<p>Non-ASCII text survives: déjà vu, Ελληνικά, 日本語.</p>"
        '<p><a href="index">Back to the main page</a>.</p>',
    ),
}


def png(width, height, rgb):
    """A solid-colour RGB PNG, made with zlib alone."""

    def chunk(kind, data):
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    row = b"\x00" + bytes(rgb) * width  # filter type 0, then the pixels
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(row * height, 9))
        + chunk(b"IEND", b"")
    )


class Entry(Item):
    def __init__(self, path, title, mimetype, content, front):
        super().__init__()
        self.path, self.title, self.mimetype = path, title, mimetype
        self.content, self.front = content, front

    def get_path(self):
        return self.path

    def get_title(self):
        return self.title

    def get_mimetype(self):
        return self.mimetype

    def get_contentprovider(self):
        return StringProvider(self.content)

    def get_hints(self):
        return {Hint.FRONT_ARTICLE: self.front}


def html(title, body):
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<title>{title}</title><link rel="stylesheet" href="style.css">'
        f"</head><body>{body}</body></html>\n"
    )


def write(path):
    creator = Creator(path).config_indexing(False, "eng")
    with creator:
        creator.set_mainpath("index")
        for page, (title, body) in PAGES.items():
            creator.add_item(Entry(page, title, "text/html", html(title, body), True))
        creator.add_item(Entry("style.css", "", "text/css", CSS, False))
        creator.add_illustration(48, png(48, 48, (0x00, 0xAA, 0x55)))
        for name, value in (
            ("Name", "zimfarm-worker_test_demo"),
            ("Title", "Zimfarm worker test"),
            ("Language", "eng"),
            ("Creator", "openZIM"),
            ("Publisher", "zimfarm-worker test suite"),
            ("Date", datetime.date.today().isoformat()),
            ("Description", "A tiny ZIM file for the zimfarm-worker tests"),
            ("Tags", "_ftindex:no;_pictures:no;_videos:no;_details:no"),
        ):
            creator.add_metadata(name, value)


def verify(path):
    archive = Archive(path)
    problems = []
    if not archive.has_checksum:
        problems.append("no checksum")
    if not archive.check():
        problems.append("libzim's integrity check failed")
    if not archive.has_main_entry:
        problems.append("no main entry")
    elif archive.main_entry.get_item().path != "index":
        problems.append("main entry is not index")
    if archive.get_metadata("Title").decode() != "Zimfarm worker test":
        problems.append("wrong Title metadata")
    if b"second page" not in bytes(archive.get_entry_by_path("index").get_item().content):
        problems.append("index page content not found")
    if problems:
        raise SystemExit(f"make_zim: {path} is not the expected ZIM: {', '.join(problems)}")
    return archive


def main(argv):
    if len(argv) != 2:
        raise SystemExit("usage: make_zim.py OUTPUT.zim")
    path = argv[1]
    if os.path.exists(path):
        os.remove(path)  # the creator refuses nothing, but never append
    write(path)
    archive = verify(path)
    print(
        f"make_zim: {path}: {archive.filesize} bytes, {archive.entry_count} entries, "
        f"checksum {archive.checksum}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main(sys.argv)
