from infer_cli.cli.app import main

main()
