import sys

try:
    from infer_cli.cli.app import main
except KeyboardInterrupt:  # Ctrl-C while Python is still importing: nothing started, nothing to undo
    sys.exit(130)

main()
