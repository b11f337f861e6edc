// pause is the pod sandbox image of the real nodes: it only waits for the
// signal that ends the sandbox, so no image from the internet is needed.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	<-stop
}
