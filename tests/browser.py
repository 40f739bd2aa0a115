"""A real headless browser for the tests: Chromium's engine as Qt WebEngine ships it in the PySide6-WebEngine wheel
(the `test` extra), which installs from PyPI alone, with its own Chromium build inside.

    python tests/browser.py PAGE.html SHOT.png DOM.html [WIDTH HEIGHT]

loads the page from disk, waits for it to load and its scripts to run, writes the DOM as the page's script left
it (`document.documentElement.outerHTML`) and a PNG screenshot of the window, and exits 0; 1 if the page did not
load within the time limit. It runs as its own process: Qt wants its application on the main thread, once.
"""

from __future__ import annotations

import os
import sys

TIMEOUT_MS = 20_000


def main(page: str, shot: str, dom: str, width: int = 1280, height: int = 1600) -> int:
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")  # no display
    # No GPU here, and the root user CI runs as cannot use Chromium's sandbox.
    os.environ.setdefault("QTWEBENGINE_CHROMIUM_FLAGS", "--disable-gpu --no-sandbox")
    os.environ.setdefault("QT_LOGGING_RULES", "*.debug=false;qt.rhi.*=false")
    from PySide6.QtCore import QSize, QTimer, QUrl
    from PySide6.QtWebEngineWidgets import QWebEngineView
    from PySide6.QtWidgets import QApplication

    app = QApplication([sys.argv[0]])
    view = QWebEngineView()
    view.resize(QSize(width, height))
    done = {"ok": False}

    def loaded(ok: bool) -> None:
        if not ok:
            app.exit(1)
            return
        view.page().runJavaScript("document.documentElement.outerHTML", 0, got_dom)

    def got_dom(html: str) -> None:
        with open(dom, "w", encoding="utf-8") as f:
            f.write(html or "")
        QTimer.singleShot(200, screenshot)  # a frame painted after the script's changes

    def screenshot() -> None:
        done["ok"] = view.grab().save(shot, "PNG")
        app.exit(0 if done["ok"] else 1)

    view.loadFinished.connect(loaded)
    view.load(QUrl.fromLocalFile(os.path.abspath(page)))
    view.show()
    QTimer.singleShot(TIMEOUT_MS, lambda: app.exit(1))
    return app.exec()


if __name__ == "__main__":
    args = sys.argv[1:]
    sys.exit(main(*args[:3], *map(int, args[3:5])))
