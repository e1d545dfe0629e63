// Command ferretdb runs FerretDB's embeddable MongoDB-protocol server for the dev and
// test stack, on its SQLite backend (the default: a directory of database files) or on its
// PostgreSQL backend (--postgresql-url; tools/devstack.py runs that PostgreSQL cluster
// when STORE_BACKEND=postgresql).
//
// The upstream `cmd/ferretdb` binary panics at start-up when built with
// `go install` (it expects a generated version.txt), so the stack runs this
// small wrapper around the supported embeddable package instead.
package main

import (
	"context"
	"database/sql"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"runtime/debug"
	"syscall"
	"time"

	"github.com/FerretDB/FerretDB/ferretdb"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	_ "modernc.org/sqlite" // the driver FerretDB's SQLite backend uses
)

func main() {
	listen := flag.String("listen-addr", "127.0.0.1:27017", "TCP address to listen on")
	dataDir := flag.String("sqlite-dir", ".run/ferretdb", "directory holding the SQLite databases")
	synchronous := flag.String("sqlite-synchronous", "normal",
		"SQLite synchronous pragma: normal (WAL: durable against process crashes, no fsync per commit) or full")
	gcPercent := flag.Int("gc-percent", 400,
		"Go GC target percentage (GOGC). FerretDB allocates heavily per document: at the default 100, GC "+
			"was ~12% of its CPU under the gateway benchmark; 400 cut its CPU per insert by 25-30% for a larger heap")
	postgreSQLURL := flag.String("postgresql-url", "",
		"PostgreSQL connection string (postgres://user@host:port/database); when set, FerretDB stores "+
			"in PostgreSQL instead of SQLite and --sqlite-dir is not used")
	flag.Parse()
	if os.Getenv("GOGC") == "" {
		debug.SetGCPercent(*gcPercent)
	}

	logger := slog.New(slog.NewJSONHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	if *postgreSQLURL != "" {
		go indexIDContainment(ctx, logger, *postgreSQLURL)
		run(ctx, logger, &ferretdb.Config{
			Listener:      ferretdb.ListenerConfig{TCP: *listen},
			Logger:        logger,
			Handler:       "postgresql",
			PostgreSQLURL: *postgreSQLURL,
		})
		return
	}

	dir, err := filepath.Abs(*dataDir)
	if err != nil {
		logger.Error("bad --sqlite-dir", "error", err)
		os.Exit(2)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		logger.Error("cannot create data directory", "dir", dir, "error", err)
		os.Exit(1)
	}

	go indexIDPaths(ctx, logger, dir)

	run(ctx, logger, &ferretdb.Config{
		Listener: ferretdb.ListenerConfig{TCP: *listen},
		Logger:   logger,
		Handler:  "sqlite",
		// Checkpoints are taken by checkpointWAL in the background, not by whichever commit
		// crosses SQLite's 1000-page mark (that commit, and the request behind it, waited).
		SQLiteURL: "file:" + dir + "/?_txlock=immediate&_pragma=synchronous(" + *synchronous + ")" +
			"&_pragma=wal_autocheckpoint(0)",
	})
}

// run serves the MongoDB protocol with config until ctx is cancelled (SIGINT/SIGTERM).
func run(ctx context.Context, logger *slog.Logger, config *ferretdb.Config) {
	f, err := ferretdb.New(config)
	if err != nil {
		logger.Error("cannot configure FerretDB", "handler", config.Handler, "error", err)
		os.Exit(1)
	}
	if err := f.Run(ctx); err != nil && ctx.Err() == nil {
		logger.Error("FerretDB stopped", "error", err)
		os.Exit(1)
	}
}

// indexIDPaths adds, to every collection table, an index on the exact expression
// FerretDB 1.24's SQLite backend filters `_id` lookups with (`_ferretdb_sjson->'$._id'`).
// The index FerretDB creates is on `_ferretdb_sjson->"_id"`, which SQLite's planner
// does not match to that expression, so without this every find/update by _id scans
// the whole table. The extra index changes no data and no semantics; it only lets
// SQLite answer `_id` lookups from an index.
func indexIDPaths(ctx context.Context, logger *slog.Logger, dir string) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-time.After(time.Second):
		}
		files, _ := filepath.Glob(filepath.Join(dir, "*.sqlite"))
		for _, file := range files {
			if err := indexFile(ctx, file); err != nil {
				logger.Debug("cannot index _id paths yet", "file", file, "error", err)
			}
			if err := checkpointWAL(ctx, file); err != nil {
				logger.Debug("cannot checkpoint yet", "file", file, "error", err)
			}
		}
	}
}

// indexFile creates the missing _id path indexes of one database file; it only reads the
// schema when nothing is missing. Like checkpointWAL it opens the file with mode=rw, never
// creating it: a database dropped since the directory was listed must stay dropped (FerretDB
// refuses to start on a database file without its metadata tables).
func indexFile(ctx context.Context, file string) error {
	db, err := sql.Open("sqlite", "file:"+file+"?mode=rw&_pragma=busy_timeout(5000)")
	if err != nil {
		return err
	}
	defer db.Close()
	rows, err := db.QueryContext(ctx, `SELECT c.table_name FROM _ferretdb_collections c
		WHERE NOT EXISTS (SELECT 1 FROM sqlite_master m
		                  WHERE m.type = 'index' AND m.name = c.table_name || '__id_path')`)
	if err != nil {
		return err
	}
	var tables []string
	for rows.Next() {
		var name string
		if err := rows.Scan(&name); err != nil {
			rows.Close()
			return err
		}
		tables = append(tables, name)
	}
	rows.Close()
	for _, table := range tables {
		q := fmt.Sprintf(`CREATE INDEX IF NOT EXISTS %q ON %q (_ferretdb_sjson->'$._id')`, table+"__id_path", table)
		if _, err := db.ExecContext(ctx, q); err != nil {
			return err
		}
	}
	return nil
}

// checkpointWAL copies the write-ahead log of one database file back into it without
// blocking writers or readers (PASSIVE), once a second, since FerretDB's connections run
// with automatic checkpoints off.
func checkpointWAL(ctx context.Context, file string) error {
	db, err := sql.Open("sqlite", "file:"+file+"?mode=rw&_pragma=busy_timeout(5000)")
	if err != nil {
		return err
	}
	defer db.Close()
	_, err = db.ExecContext(ctx, "PRAGMA wal_checkpoint(PASSIVE)")
	return err
}

// idContainmentIndexRepairs lists, as statements, what the GIN indexes on `_jsonb -> '_id'`
// of FerretDB's collection tables (a `_jsonb` column, in a schema per MongoDB database) lack:
// a CREATE INDEX for a table without one, an ALTER INDEX for one that still has GIN's pending
// list on (fastupdate, PostgreSQL's default). With the pending list, new keys wait unsorted
// until a vacuum merges them, and every `{_id: v}` lookup reads the whole list: under a steady
// insert flow (4 writers) the lookups grew slower for the minute between two autovacuums (p50
// 5 -> 13 ms), and the flow ran at 482 pairs/s against 745 with fastupdate off (docs/benchmarks.md,
// "Store backend").
const idContainmentIndexRepairs = `
SELECT format('CREATE INDEX IF NOT EXISTS %I ON %I.%I USING gin ((_jsonb -> ''_id'')) WITH (fastupdate = off)',
              c.relname || '__id_gin', n.nspname, c.relname)
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'public')
  AND n.nspname NOT LIKE 'pg\_%' AND c.relname <> '_ferretdb_database_metadata'
  AND EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attname = '_jsonb')
  AND NOT EXISTS (SELECT 1 FROM pg_class i WHERE i.relnamespace = n.oid AND i.relname = c.relname || '__id_gin')
UNION ALL
SELECT format('ALTER INDEX %I.%I SET (fastupdate = off)', n.nspname, i.relname)
FROM pg_class i JOIN pg_namespace n ON n.oid = i.relnamespace
WHERE i.relkind = 'i' AND i.relname LIKE '%\_\_id\_gin'
  AND NOT coalesce('fastupdate=off' = ANY (i.reloptions), false)`

// indexIDContainment adds, once a second, to every collection table of FerretDB 1.24's
// PostgreSQL backend a GIN index on `_jsonb -> '_id'`. That backend filters `{_id: v}` with
// `_jsonb -> $1 @> $2`, which its own (btree) `_id` index cannot answer, so without this every
// find by _id reads the whole table (the 1,000-call benchmark: 10,547 sequential scans reading
// 10.1 million rows). A GIN index supports `@>`; with plan_cache_mode=force_custom_plan (set by
// tools/devstack.py) the key parameter is planned as the constant '_id' and the index is used.
// Like indexIDPaths on SQLite, it changes no data and no semantics.
func indexIDContainment(ctx context.Context, logger *slog.Logger, url string) {
	var conn *pgx.Conn
	defer func() {
		if conn != nil {
			conn.Close(context.Background())
		}
	}()
	for {
		select {
		case <-ctx.Done():
			return
		case <-time.After(time.Second):
		}
		var err error
		if conn == nil {
			// url is FerretDB's: pgxpool's parser takes its pool_* settings out of what one
			// connection sends PostgreSQL (which would refuse them as unknown parameters).
			var config *pgxpool.Config
			if config, err = pgxpool.ParseConfig(url); err != nil {
				logger.Error("bad --postgresql-url", "error", err)
				return
			}
			if conn, err = pgx.ConnectConfig(ctx, config.ConnConfig); err != nil {
				conn = nil
				logger.Debug("cannot connect for the _id containment indexes yet", "error", err)
				continue
			}
		}
		if err = addIDContainmentIndexes(ctx, conn); err != nil {
			logger.Debug("cannot index _id containment yet", "error", err)
			if conn.IsClosed() {
				conn = nil
			}
		}
	}
}

func addIDContainmentIndexes(ctx context.Context, conn *pgx.Conn) error {
	rows, err := conn.Query(ctx, idContainmentIndexRepairs)
	if err != nil {
		return err
	}
	statements, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return err
	}
	for _, statement := range statements {
		if _, err := conn.Exec(ctx, statement); err != nil {
			return err // a collection dropped meanwhile: the next pass lists the rest again
		}
	}
	return nil
}
