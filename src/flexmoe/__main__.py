from flexmoe.cli import main

main()
