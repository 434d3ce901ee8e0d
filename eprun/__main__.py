from eprun.cli import main

main()
