from edgeforge.cli import main

main()
