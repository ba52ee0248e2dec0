/* replay.c: run a fuzz target's function over saved inputs, without libFuzzer
 * (any compiler): `replay FILE_OR_DIR...`. `make ctest` replays the seed corpora
 * and every saved crash (tests/fuzz/corpus) under ASan and UBSan, so that an
 * input that once crashed stays a regression test even where clang is missing. */
#include <dirent.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static int run_file(const char *path) {
  FILE *f = fopen(path, "rb");
  uint8_t *buf;
  long n;
  if (f == NULL) return -1;
  fseek(f, 0, SEEK_END);
  n = ftell(f);
  fseek(f, 0, SEEK_SET);
  buf = malloc(n > 0 ? (size_t)n : 1);
  if (buf == NULL || (n > 0 && fread(buf, 1, (size_t)n, f) != (size_t)n)) {
    fclose(f);
    free(buf);
    return -1;
  }
  fclose(f);
  LLVMFuzzerTestOneInput(buf, (size_t)n);
  free(buf);
  return 0;
}

int main(int argc, char **argv) {
  int files = 0;
  for (int i = 1; i < argc; i++) {
    struct stat st;
    if (stat(argv[i], &st) != 0) {
      fprintf(stderr, "replay: no such input %s\n", argv[i]);
      return 1;
    }
    if (S_ISDIR(st.st_mode)) {
      DIR *d = opendir(argv[i]);
      struct dirent *e;
      char path[4096];
      while (d != NULL && (e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.') continue;
        snprintf(path, sizeof(path), "%s/%s", argv[i], e->d_name);
        if (run_file(path) == 0) files++;
      }
      if (d != NULL) closedir(d);
    } else if (run_file(argv[i]) == 0) {
      files++;
    }
  }
  printf("replay %s: %d inputs, no crash\n", argc > 1 ? argv[1] : "", files);
  return 0;
}
