// slowproxy serves a registry's content at a capped rate, so that a pull of
// a large image takes long enough for a test to stop a kubelet in the middle
// of it. It forwards every request unchanged to the upstream registry and
// only slows down the response bodies.
//
// usage: slowproxy LISTEN_ADDR UPSTREAM_URL BYTES_PER_SECOND
package main

import (
	"fmt"
	"io"
	"log"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"strconv"
	"time"
)

// throttledWriter sleeps after each chunk so that the average rate stays at
// or under bytesPerSecond.
type throttledWriter struct {
	w              io.Writer
	bytesPerSecond int
	start          time.Time
	written        int
}

func (t *throttledWriter) Write(p []byte) (int, error) {
	const chunk = 32 * 1024
	total := 0
	for len(p) > 0 {
		n := min(chunk, len(p))
		m, err := t.w.Write(p[:n])
		total += m
		t.written += m
		if err != nil {
			return total, err
		}
		if f, ok := t.w.(http.Flusher); ok {
			f.Flush()
		}
		p = p[n:]
		due := t.start.Add(time.Duration(float64(t.written) / float64(t.bytesPerSecond) * float64(time.Second)))
		if wait := time.Until(due); wait > 0 {
			time.Sleep(wait)
		}
	}
	return total, nil
}

type throttledResponse struct {
	http.ResponseWriter
	body *throttledWriter
}

func (r *throttledResponse) Write(p []byte) (int, error) { return r.body.Write(p) }

func main() {
	if len(os.Args) != 4 {
		fmt.Fprintln(os.Stderr, "usage: slowproxy LISTEN_ADDR UPSTREAM_URL BYTES_PER_SECOND")
		os.Exit(2)
	}
	upstream, err := url.Parse(os.Args[2])
	if err != nil {
		log.Fatalf("slowproxy: upstream %q: %v", os.Args[2], err)
	}
	rate, err := strconv.Atoi(os.Args[3])
	if err != nil || rate <= 0 {
		log.Fatalf("slowproxy: BYTES_PER_SECOND must be a positive integer, got %q", os.Args[3])
	}
	proxy := httputil.NewSingleHostReverseProxy(upstream)
	// Flush as we go, so that the client sees a steady trickle, not one burst.
	proxy.FlushInterval = -1
	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		slow := &throttledResponse{ResponseWriter: w, body: &throttledWriter{w: w, bytesPerSecond: rate, start: time.Now()}}
		proxy.ServeHTTP(slow, r)
	})
	log.Printf("slowproxy: %s -> %s at %d bytes/s", os.Args[1], upstream, rate)
	log.Fatal(http.ListenAndServe(os.Args[1], handler))
}
