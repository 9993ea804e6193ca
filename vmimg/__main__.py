from vmimg.cli import main

main()
