package main

import (
	"context"
	"database/sql"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"testing"
)

// A database dropped between listing the directory and the upkeep's visit must not be
// re-created as an empty file.
func TestUpkeepNeverCreatesADatabaseFile(t *testing.T) {
	ctx := context.Background()
	missing := filepath.Join(t.TempDir(), "dropped.sqlite")
	if err := indexFile(ctx, missing); err == nil {
		t.Error("indexFile on a missing file: no error")
	}
	if err := checkpointWAL(ctx, missing); err == nil {
		t.Error("checkpointWAL on a missing file: no error")
	}
	if _, err := os.Stat(missing); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("the upkeep created %s (stat: %v)", missing, err)
	}
}

// On a database of FerretDB's shape, the upkeep adds the _id path index and checkpoints.
func TestUpkeepIndexesAndCheckpoints(t *testing.T) {
	ctx := context.Background()
	file := filepath.Join(t.TempDir(), "db.sqlite")
	db, err := sql.Open("sqlite", "file:"+file+"?_pragma=journal_mode(wal)")
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	for _, q := range []string{
		`CREATE TABLE _ferretdb_collections (name TEXT, table_name TEXT)`,
		`CREATE TABLE calls_1 (_ferretdb_sjson TEXT)`,
		`INSERT INTO _ferretdb_collections VALUES ('calls', 'calls_1')`,
		`INSERT INTO calls_1 VALUES ('{"_id": "c1"}')`,
	} {
		if _, err := db.ExecContext(ctx, q); err != nil {
			t.Fatal(q, err)
		}
	}
	if err := indexFile(ctx, file); err != nil {
		t.Fatal(err)
	}
	var n int
	if err := db.QueryRowContext(ctx,
		`SELECT count(*) FROM sqlite_master WHERE type = 'index' AND name = 'calls_1__id_path'`).Scan(&n); err != nil || n != 1 {
		t.Fatalf("no _id path index (count %d, %v)", n, err)
	}
	if err := checkpointWAL(ctx, file); err != nil {
		t.Fatal(err)
	}
}
