"""`wallet` / `python -m wallet_tui`: run the Strife wallet."""
from __future__ import annotations

import sys

from wallet_tui.app import make_app


def main(argv: list[str] | None = None) -> None:
    app = make_app(sys.argv[1:] if argv is None else argv)
    if not app.settings.ca_path.is_file():  # say so before the screen is taken over
        sys.exit(f"wallet: cannot read the CA certificate {app.settings.ca_path} (use --certs-dir; "
                 "`python -m servers.certs` creates it)")
    app.run()
    if isinstance(app.return_code, int) and app.return_code:
        sys.exit(app.return_code)


if __name__ == "__main__":
    main()
