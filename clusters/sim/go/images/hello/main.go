// hello is the entrypoint of the test images. Pull pods never run it (they
// run the no-op helper, or a path that does not exist); it is there so a
// person can run the images by hand and see which one they got.
package main

import (
	"fmt"
	"os"
)

func main() {
	host, _ := os.Hostname()
	fmt.Printf("hello from %s, image %s, args=%v\n", host, os.Getenv("TEST_IMAGE"), os.Args[1:])
}
