"""Answer an active-learning run's queried pixels in the browser.

    python scripts/annotate.py --state outputs/al_human/runs/balent/seed_0 [--port 8765]
    python scripts/annotate.py --state ... --export-labelstudio DIR    # tasks.json + config + images
    python scripts/annotate.py --state ... --import-labelstudio FILE   # Label Studio's JSON export
    python scripts/annotate.py --state ... --export-cvat DIR           # CVAT for images 1.1 XML + images
    python scripts/annotate.py --state ... --import-cvat FILE

Prints a URL with a random access token; open it, answer, then re-run scripts/active_learning.py
with the same config to train on the answers and continue the loop. Binds to 127.0.0.1 unless
--host says otherwise.
"""

import argparse
import contextlib
import sys
from pathlib import Path

import uvicorn

from al.annotate.app import create_app
from al.annotate.exchange import (
    ImportAnswersError,
    export_cvat,
    export_labelstudio,
    import_cvat,
    import_labelstudio,
)
from al.annotate.session import AnnotationError, AnnotationSession
from al.cli import cli_entry
from al.folder_lock import FolderLock


# besides the common ones: an export that cannot be imported, an answer the session refuses
@cli_entry(ImportAnswersError, AnnotationError)
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--state", required=True, type=Path, help="a run folder: <output_dir>/runs/<acquisition>/seed_<s>")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--token", help="access token (default: a fresh random one)")
    parser.add_argument("--export-labelstudio", type=Path, metavar="DIR", help="write Label Studio tasks and exit")
    parser.add_argument("--import-labelstudio", type=Path, metavar="FILE", help="import a Label Studio export and exit")
    parser.add_argument("--export-cvat", type=Path, metavar="DIR", help="write CVAT points (XML) and images, and exit")
    parser.add_argument("--import-cvat", type=Path, metavar="FILE", help="import a CVAT for images 1.1 XML and exit")
    args = parser.parse_args(argv)
    # the run's one writer while it answers: a second page, an import or the AL loop itself is refused
    with contextlib.ExitStack() as held:
        if args.state.is_dir():  # (a missing run folder is explained by the session, not created)
            held.enter_context(FolderLock(args.state, "active-learning run"))
        session = AnnotationSession(args.state)
        if args.export_labelstudio:
            path = export_labelstudio(session, args.export_labelstudio)
            print(f"wrote {path} and {args.export_labelstudio / 'labelling_config.xml'}; serve "
                  f"{args.export_labelstudio} as Label Studio local files storage")
            return 0
        if args.export_cvat:
            print(f"wrote {export_cvat(session, args.export_cvat)}; upload it with the images of {args.export_cvat}")
            return 0
        imports = [(args.import_labelstudio, import_labelstudio), (args.import_cvat, import_cvat)]
        for path, read in imports:
            if path:
                print(f"imported: {read(session, path)}; progress: "
                      f"{session.progress()['answered']}/{session.progress()['total']}")
                return 0
        app = create_app(session, args.token)
        progress = session.progress()
        print(f"{progress['total'] - progress['answered']} of {progress['total']} queries of {progress['tag']} pending")
        print(f"open http://{args.host}:{args.port}/?token={app.state.token}", flush=True)
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0

if __name__ == "__main__":
    sys.exit(main())
