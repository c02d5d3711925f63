from longsum.cli import main

main()
