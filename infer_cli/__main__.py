from infer_cli.console import main

main()
