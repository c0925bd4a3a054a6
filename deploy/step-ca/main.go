// Command step-ca runs smallstep's step-ca 0.19 from Debian's packaged library
// source (golang-github-smallstep-certificates-dev ships no cmd/step-ca).
// Build it with deploy/step-ca/build.sh.
package main

import (
	"fmt"
	"os"

	"github.com/smallstep/certificates/commands"
	"github.com/urfave/cli"
	"go.step.sm/cli-utils/command"
)

func main() {
	app := cli.NewApp()
	app.Name = "step-ca"
	app.Usage = "an online certificate authority (Tessera build)"
	app.UsageText = "step-ca [--password-file <file>] <config>"
	app.Version = "0.19.0-debian"
	// The flags and action of the upstream binary; flags go before <config>.
	// cli.HelpFlag is added by hand: the registered commands bring their own
	// "help" command, which stops urfave/cli from adding --help itself.
	app.Flags = append(commands.AppCommand.Flags, cli.HelpFlag)
	app.Action = commands.AppCommand.Action
	// Subcommands that the commands package registers (export, onboard).
	app.Commands = command.Retrieve()
	if err := app.Run(os.Args); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
