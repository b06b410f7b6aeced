from edgeforge.cli.app import main

main()
