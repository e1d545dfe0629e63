// Command ferretdb runs FerretDB's embeddable MongoDB-protocol server on its
// SQLite backend for the dev and test stack.
//
// The upstream `cmd/ferretdb` binary panics at start-up when built with
// `go install` (it expects a generated version.txt), so the stack runs this
// small wrapper around the supported embeddable package instead.
package main

import (
	"context"
	"flag"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"

	"github.com/FerretDB/FerretDB/ferretdb"
)

func main() {
	listen := flag.String("listen-addr", "127.0.0.1:27017", "TCP address to listen on")
	dataDir := flag.String("sqlite-dir", ".run/ferretdb", "directory holding the SQLite databases")
	synchronous := flag.String("sqlite-synchronous", "normal",
		"SQLite synchronous pragma: normal (WAL: durable against process crashes, no fsync per commit) or full")
	flag.Parse()

	logger := slog.New(slog.NewJSONHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))

	dir, err := filepath.Abs(*dataDir)
	if err != nil {
		logger.Error("bad --sqlite-dir", "error", err)
		os.Exit(2)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		logger.Error("cannot create data directory", "dir", dir, "error", err)
		os.Exit(1)
	}

	f, err := ferretdb.New(&ferretdb.Config{
		Listener:  ferretdb.ListenerConfig{TCP: *listen},
		Logger:    logger,
		Handler:   "sqlite",
		SQLiteURL: "file:" + dir + "/?_txlock=immediate&_pragma=synchronous(" + *synchronous + ")",
	})
	if err != nil {
		logger.Error("cannot configure FerretDB", "error", err)
		os.Exit(1)
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	if err := f.Run(ctx); err != nil && ctx.Err() == nil {
		logger.Error("FerretDB stopped", "error", err)
		os.Exit(1)
	}
}
